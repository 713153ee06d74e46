"""PyTorch's habits met by a port (an nn.Module's methods asked of a model, PyTorch's
ReduceLROnPlateau and CrossEntropyLoss keywords, a torch loss or optimiser given to compile, a
model saved as ``.pt``): refused naming xpcnn's way, never a bare AttributeError or TypeError,
never a file that torch.load cannot read."""

import copy
import pickle

import numpy as np
import pytest

import xpcnn
from xpcnn import optim
from xpcnn.callbacks import ModelCheckpoint, ReduceLROnPlateau
from xpcnn.errors import InputError
from xpcnn.layers import Dense
from xpcnn.losses import SoftmaxCrossEntropy, get_loss


def _model() -> xpcnn.Sequential:
    return xpcnn.Sequential([Dense(3)], input_shape=(4,), seed=0)


# -- 1. nn.Module's methods and attributes --------------------------------------------------

@pytest.mark.parametrize(("name", "way"), [
    ("train", "fit trains"), ("eval", "predict, evaluate and model\\(x\\) infer"),
    ("training", "no mode to set"), ("parameters", "trainable_weights"),
    ("named_parameters", "trainable_weights"), ("zero_grad", "drops its gradients"),
    ("state_dict", "get_weights\\(\\)"), ("load_state_dict", "set_weights\\(ws\\)"),
    ("cuda", "model.to\\('cuda'\\)"), ("cpu", "model.to\\('cpu'\\)"),
    ("double", "dtype='float64'"), ("float", "dtype="), ("half", "precision='mixed_float16'"),
    ("modules", "model.layers"), ("children", "model.layers")])
def test_module_names_name_xpcnns_way(name: str, way: str) -> None:
    model = _model()
    with pytest.raises(InputError, match=f"Sequential has no {name}.*PyTorch's nn.Module.*{way}"
                       ) as caught:
        getattr(model, name)
    assert isinstance(caught.value, AttributeError)
    assert not hasattr(model, name)  # (an AttributeError: hasattr and getattr's default work)
    assert getattr(model, name, "default") == "default"


def test_other_missing_attributes_keep_pythons_error() -> None:
    model = _model()
    with pytest.raises(AttributeError) as caught:
        model.no_such_thing  # noqa: B018
    assert type(caught.value) is AttributeError
    assert str(caught.value) == "'Sequential' object has no attribute 'no_such_thing'"
    assert caught.value.name == "no_such_thing" and caught.value.obj is model


def test_a_property_raising_attribute_error_keeps_its_own_message() -> None:
    """Its message, raised once (review R6: a __getattr__ ran it again), and a subclass's own
    ``training`` wins over the advice."""
    runs = []

    class Odd(xpcnn.Sequential):
        @property
        def broken(self) -> int:
            runs.append(1)
            raise AttributeError("broken's own message")

        @property
        def training(self) -> bool:
            raise AttributeError("Odd's own training")

    odd = Odd([Dense(2)], input_shape=(3,))
    with pytest.raises(AttributeError, match="broken's own message"):
        odd.broken  # noqa: B018
    assert len(runs) == 1
    with pytest.raises(AttributeError, match="Odd's own training"):
        odd.training  # noqa: B018


def test_lookups_before_init_and_copies_do_not_recurse() -> None:
    bare = xpcnn.Sequential.__new__(xpcnn.Sequential)  # (as unpickling makes one)
    assert not hasattr(bare, "train") and not hasattr(bare, "layers")
    with pytest.raises(AttributeError, match="no attribute '_layers'"):
        bare.layers  # noqa: B018
    model = _model()
    for clone in (copy.copy, copy.deepcopy, pickle.dumps):  # (refused as before, by name)
        with pytest.raises(InputError, match="cannot be copied or pickled"):
            clone(model)


def test_existing_counterparts_still_work() -> None:
    model = _model()
    assert model.to("cpu") is model
    assert len(model.trainable_weights) == 2 and len(model.get_weights()) == 2


# -- 2. ReduceLROnPlateau ---------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value", "way"), [
    ("threshold", 1e-4, "min_delta is absolute.*relative"),
    ("threshold_mode", "rel", "min_delta is absolute"),
    ("eps", 1e-8, "leave eps out")])
def test_plateau_torch_keywords_name_xpcnns(key: str, value: object, way: str) -> None:
    with pytest.raises(InputError, match=f"ReduceLROnPlateau\\({key}=.*PyTorch's keyword.*{way}"
                       ".*callbacks=.*patience=p \\+ 1"):
        ReduceLROnPlateau(mode="min", factor=0.5, patience=2, **{key: value})


def test_plateau_unknown_keyword_keeps_pythons_error() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'") as caught:
        ReduceLROnPlateau(nonsense=1)
    assert not isinstance(caught.value, InputError)


def test_plateau_given_an_optimizer_first() -> None:
    with pytest.raises(InputError, match="given an optimizer \\(SGD\\) first, PyTorch's order"
                       ".*takes no optimizer.*callbacks=\\[ReduceLROnPlateau\\(monitor='val_loss'"):
        ReduceLROnPlateau(optim.SGD(0.1), "min")
    torch = pytest.importorskip("torch")
    with pytest.raises(InputError, match="given an optimizer \\(SGD\\) first"):
        ReduceLROnPlateau(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), "min")


def test_plateau_shared_keywords_still_taken() -> None:
    cb = ReduceLROnPlateau(mode="min", factor=0.5, patience=3, cooldown=1, min_lr=1e-5)
    assert (cb.patience, cb.cooldown, cb.min_lr) == (3, 1, 1e-5)


# -- 3. CrossEntropyLoss' keywords and torch losses ----------------------------------------

def test_loss_weight_names_class_weight() -> None:
    with pytest.raises(InputError, match="weight=.*PyTorch's keyword.*class_weight=dict"
                       "\\(enumerate\\(w\\)\\).*batch size.*sum of the samples' weights"
                       ):
        SoftmaxCrossEntropy(from_logits=True, weight=np.array([1.0, 5.0, 1.0]))


def test_loss_ignore_index_names_sample_weight() -> None:
    with pytest.raises(InputError, match="ignore_index=.*sample_weight 0"):
        SoftmaxCrossEntropy(ignore_index=0)


def test_loss_torch_defaults_taken_and_signature_unchanged() -> None:
    import inspect

    loss = SoftmaxCrossEntropy(weight=None, ignore_index=-100)  # (what xpcnn does)
    assert loss.get_config() == {"label_smoothing": 0.0}
    assert "weight" not in inspect.signature(SoftmaxCrossEntropy).parameters
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        SoftmaxCrossEntropy(nonsense=1)


@pytest.mark.parametrize("name", ["nll_loss", "nll", "CrossEntropyLoss", "NLLLoss"])
def test_torch_loss_names(name: str) -> None:
    with pytest.raises(InputError, match=f"unknown loss '{name}', PyTorch's.*loss="
                       "'sparse_categorical_crossentropy'.*'cross_entropy'.*Dense\\(classes\\) "
                       "with no softmax.*log_softmax \\+ nll_loss the same"):
        get_loss(name)


def test_torch_loss_objects() -> None:
    torch = pytest.importorskip("torch")
    for loss in (torch.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss, torch.nn.NLLLoss(),
                 torch.nn.functional.nll_loss, torch.nn.functional.cross_entropy):
        with pytest.raises(InputError, match="PyTorch's .*loss='sparse_categorical_"
                           "crossentropy'.*class_weight"):
            _model().compile(loss=loss)


# -- 4. a torch optimiser given to compile ---------------------------------------------------

def test_torch_optimizer_names_xpcnns() -> None:
    torch = pytest.importorskip("torch")
    params = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(InputError, match="PyTorch's torch.optim.SGD.*xpcnn.optim.SGD\\(0.1, "
                       "...\\).*momentum=.*compile binds") as caught:
        _model().compile(optimizer=torch.optim.SGD(params, lr=0.1, momentum=0.9))
    assert "\n" not in str(caught.value)  # (was torch's repr, over many lines)
    with pytest.raises(InputError, match="torch.optim.Adadelta.*xpcnn has no Adadelta"):
        _model().compile(optimizer=torch.optim.Adadelta(params, lr=1.0))


# -- 5. files named as torch.save's ------------------------------------------------------------

@pytest.mark.parametrize("name", ["mnist_cnn.pt", "model.PTH"])
def test_torch_suffixes_refused(tmp_path, name: str) -> None:
    model = _model()
    model.compile(optimizer="sgd")
    path = tmp_path / name
    for write in (model.save, model.save_weights):
        with pytest.raises(InputError, match="torch.save's files.*torch.load does not read.*"
                           "\\.npz"):
            write(path)
    with pytest.raises(InputError, match="torch.save's files"):
        ModelCheckpoint(str(path))
    x, y = np.zeros((4, 4), np.float32), np.array([0, 1, 2, 0])
    with pytest.raises(InputError, match="torch.save's files"):
        model.fit(x, y, epochs=1, verbose=0, checkpoint=str(path))
    assert not path.exists()
    model.save(tmp_path / "m.npz")  # (xpcnn's own name still written)
    assert (tmp_path / "m.npz").exists()
