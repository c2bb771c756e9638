"""How a model is loaded: the options of every command that loads one, defined once.

The commands take them as ``--device``, ``--dtype`` and ``--device-map`` (a ``loading:`` section in a
``--config`` file); the library calls take a :class:`LoadOptions` and hand :meth:`LoadOptions.as_kwargs` to
``layershap.oracle.loading.load_model``.

Example:
    >>> LoadOptions(device="cpu", dtype="bfloat16").as_kwargs()
    {'device': 'cpu', 'dtype': 'bfloat16', 'device_map': None}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

DeviceName = Literal["auto", "cpu", "cuda"]
DtypeName = Literal["float32", "bfloat16", "float16"]
# accelerate's placement strategies accepted by --device-map (shard one model over the GPUs a process sees).
DeviceMapName = Literal["auto", "balanced", "balanced_low_0", "sequential"]
DEVICE_MAPS: tuple[str, ...] = get_args(DeviceMapName)


@dataclass(frozen=True)
class LoadOptions:
    """How to load the model.

    Args:
        device: auto = CUDA when available, else CPU; the weights are read straight onto it.
        dtype: weights dtype (default float32 on CPU, bfloat16 on CUDA).
        device_map: shard the model over the GPUs of this process (accelerate: auto, balanced, balanced_low_0,
            sequential), for models larger than one GPU.
    """

    device: DeviceName = "auto"
    dtype: DtypeName | None = None
    device_map: DeviceMapName | None = None

    def as_kwargs(self) -> dict:
        """The keywords of ``load_model``: ``device``, ``dtype`` (a name) and ``device_map``."""
        return asdict(self)


DEFAULT_LOADING = LoadOptions()  # auto device, the device's dtype, no device map
CPU_LOADING = LoadOptions(device="cpu")  # the default of `layershap prune`: no GPU needed to cut layers out
