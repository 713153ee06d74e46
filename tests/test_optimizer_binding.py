"""An optimiser trains one model: ``model.optimizer = ...`` binds it as compile does, and a copy
(``copy.copy``, ``copy.deepcopy``, pickle) is one of its own, bound to no model, with the
original's state."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from nets import four_class_data, four_class_net

import xpcnn
from xpcnn import optim
from xpcnn.errors import InputError
from xpcnn.layers import Dense, Flatten, Softmax

X, Y = four_class_data()


def net(seed: int = 0, **kwargs) -> xpcnn.Sequential:
    return xpcnn.Sequential(four_class_net(), seed=seed, input_shape=(6, 6, 3), **kwargs)


def assert_same_weights(a: xpcnn.Sequential, b: xpcnn.Sequential) -> None:
    for p, q in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(p, q)


def test_assigning_another_models_optimizer_is_refused_as_compile_refuses_it():
    """(was: fit failed with a bare IndexError inside the step, or, where the shapes agree,
    trained the second model on the first one's momentum, silently)"""
    a, b = net(0), net(1)
    a.compile(optimizer=optim.SGD(0.1, momentum=0.9))
    a.fit(X, Y, verbose=0)
    b.compile(optimizer="sgd")
    before = b.optimizer
    with pytest.raises(InputError, match="this SGD optimizer is already compiled into model "
                                         f"'{a.name}': an optimizer holds one model's state"):
        b.optimizer = a.optimizer
    assert b.optimizer is before


def test_assigning_an_optimizer_trains_as_compile_with_it_would():
    assigned, compiled = net(1), net(1)
    assigned.compile(optimizer="sgd")
    assigned.optimizer = optim.SGD(0.1, momentum=0.9)
    compiled.compile(optimizer=optim.SGD(0.1, momentum=0.9))
    for model in (assigned, compiled):
        model.fit(X, Y, epochs=2, shuffle=False, verbose=0)
    assert_same_weights(assigned, compiled)
    assert assigned.optimizer.iterations == 2


def test_assigning_a_name_makes_that_optimizer():
    """(was: a bare AttributeError, 'str' object has no attribute 'slots', in fit)"""
    model = net(2)
    model.compile(optimizer="sgd")
    model.optimizer = "adam"
    assert isinstance(model.optimizer, optim.Adam)
    model.fit(X, Y, verbose=0)
    assert model.optimizer.iterations == 1
    with pytest.raises(InputError, match="unknown optimizer"):
        model.optimizer = "adamm"


def test_an_assigned_optimizer_is_released_by_the_next_compile():
    """(was: compile failed with a bare AttributeError, '_model', on an optimizer assigned)"""
    first, second = net(3), net(4)
    first.compile(optimizer="sgd")
    assigned = optim.Adam(1e-3)
    first.optimizer = assigned
    first.fit(X, Y, verbose=0)
    first.compile(optimizer="sgd")  # releases it
    second.compile(optimizer=assigned)  # as a new one: the state was first's
    assert second.optimizer is assigned and assigned.iterations == 0 and not assigned.slots


def test_assigning_none_leaves_the_model_to_compile():
    model = net(5)
    model.compile(optimizer="adam")
    released = model.optimizer
    model.optimizer = None
    with pytest.raises(InputError, match="call compile"):
        model.fit(X, Y, verbose=0)
    other = net(6)
    other.compile(optimizer=released)  # (free once released)
    assert other.optimizer is released


@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle"])
def test_a_copy_of_a_compiled_optimizer_is_bound_to_no_model(how):
    """(was: the copy stayed bound to the original's model, and compiling it into another one
    was refused as 'already compiled into model ...'; pickle: a bare TypeError about a
    weakref)"""
    duplicate = {"deepcopy": copy.deepcopy, "copy": copy.copy,
                 "pickle": lambda o: pickle.loads(pickle.dumps(o))}[how]
    opt = optim.Adam(1e-3)
    a, b = net(0), net(1)
    a.compile(optimizer=opt)
    copied = duplicate(opt)
    assert copied is not opt and copied.get_config() == opt.get_config()
    b.compile(optimizer=copied)
    assert b.optimizer is copied
    with pytest.raises(InputError, match="already compiled into model"):
        net(2).compile(optimizer=opt)  # (the original stays a's)


@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle"])
@pytest.mark.parametrize("make", [lambda: optim.SGD(0.05, momentum=0.9),
                                  lambda: optim.Adam(0.01, amsgrad=True)],
                         ids=["sgd_momentum", "adam"])
def test_a_copied_optimizer_goes_on_bit_for_bit_as_the_original(how, make):
    duplicate = {"deepcopy": copy.deepcopy, "copy": copy.copy,
                 "pickle": lambda o: pickle.loads(pickle.dumps(o))}[how]
    a, b = net(0, dtype="float64"), net(1, dtype="float64")
    a.compile(optimizer=make())
    a.fit(X, Y, epochs=3, batch_size=8, verbose=0)
    a.optimizer.lr = 0.02  # (lr_factor too)
    copied = duplicate(a.optimizer)
    original = a.optimizer
    assert copied.iterations == original.iterations == 9
    assert copied.lr_factor == original.lr_factor
    assert copied.slots.keys() == original.slots.keys()
    for name, arrays in original.slots.items():
        for s, t in zip(arrays, copied.slots[name], strict=True):
            assert s is not t
            np.testing.assert_array_equal(s, t)
    if original.applied is not None:
        assert copied.applied is not original.applied
        assert float(copied.applied) == float(original.applied)
    b.set_weights(a.get_weights())
    b.compile(optimizer=copied)
    for model in (a, b):
        model.fit(X, Y, epochs=2, batch_size=8, shuffle=False, verbose=0)
    assert_same_weights(a, b)
    assert copied.iterations == original.iterations == 15


def test_a_copied_state_that_does_not_fit_the_model_is_refused():
    """(a copy keeps its state: compiled where its slots are not the trained parameters', the
    first step would fail deep inside, or mix one parameter's momentum into another)"""
    a = net(0)
    a.compile(optimizer=optim.SGD(0.1, momentum=0.9))
    a.fit(X, Y, verbose=0)
    copied = copy.deepcopy(a.optimizer)
    wider = xpcnn.Sequential([Flatten(), Dense(7), Dense(4), Softmax()], input_shape=(6, 6, 3))
    wider.compile(optimizer="sgd")
    kept = wider.optimizer
    with pytest.raises(InputError, match=r"'momentum' slots do not fit model '.*'s trained "
                                         r"parameters: they are \[\(\(3, 3, 3, 3\)"):
        wider.compile(optimizer=copied)
    assert wider.optimizer is kept and copied.iterations == 1  # (nothing changed)
    with pytest.raises(InputError, match="is not built: build it first"):
        xpcnn.Sequential(four_class_net()).compile(optimizer=copied)
    narrow = net(1, dtype="float64")
    with pytest.raises(InputError, match="do not fit"):
        narrow.optimizer = copied
    fits = net(2)
    fits.compile(optimizer="sgd")
    fits.optimizer = copied
    fits.fit(X, Y, verbose=0)
    assert copied.iterations == 2
