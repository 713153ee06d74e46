"""What the scripts here share and the ``xpcnn`` command does not use: their argument parser
and the recipes' flag values. (Scripts run as ``python scripts/<x>.py``, which puts this folder
on ``sys.path``.)"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import Any, NoReturn

from xpcnn import checks
from xpcnn.cli import UsageError, flag_type
from xpcnn.errors import DataFormatError, DownloadError


class ScriptParser(argparse.ArgumentParser):
    """The scripts' parser, as the command's: abbreviated flags refused, and a usage error one
    line on stderr with exit status 2 (:meth:`check` for :mod:`xpcnn.cli`'s checks of paths
    and devices, run before any data is loaded)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # (``--jso`` is not taken for ``--json``, as in the command's parser)
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")

    def check(self, check: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """``check(*args, **kwargs)`` (``output_file``, ``input_folder``, ...), a UsageError its
        one line."""
        try:
            check(*args, **kwargs)
        except UsageError as e:
            self.error(str(e))

    def data(self, load: Callable[..., Any], *args: Any) -> Any:
        """``load(*args)`` (a dataset's loader), a download or file it refuses its one line."""
        try:
            return load(*args)
        except (DownloadError, DataFormatError) as e:
            self.error(str(e))


# (the recipe scripts' flags)
WEIGHT_DECAY = flag_type(float, partial(checks.number, low=0.0),
                         "a weight decay >= 0, such as 5e-4")
SMOOTHING = flag_type(float, partial(checks.number, low=0.0, high=1.0, high_open=True),
                      "a label smoothing from 0 to 1 (1 excluded), such as 0.1")
CEILING = flag_type(float, partial(checks.number, low=0.0, low_open=True),
                    "a ReLU ceiling > 0, such as 1")
