"""The one OpenRLHF version this package is written against, checked at start-up."""

from __future__ import annotations

import importlib.metadata

REQUIRED_OPENRLHF = "0.11.2"


class OpenRLHFVersionError(RuntimeError):
    """The installed openrlhf is missing or not the exact version our hooks were written for."""


def check_openrlhf_version(installed: str | None = None) -> str:
    """Return the installed openrlhf version, or raise unless it is exactly `REQUIRED_OPENRLHF`.

    The 0.11 line renamed every CLI flag and reshaped the experience maker; a near miss is not safe.
    """
    if installed is None:
        try:
            installed = importlib.metadata.version("openrlhf")
        except importlib.metadata.PackageNotFoundError:
            raise OpenRLHFVersionError(
                f"openrlhf is not installed; install openrlhf=={REQUIRED_OPENRLHF} (see requirements-gpu.txt)"
            ) from None
    if installed != REQUIRED_OPENRLHF:
        raise OpenRLHFVersionError(
            f"openrlhf {installed} is installed, but openrlhf_ext supports exactly {REQUIRED_OPENRLHF}; "
            f"install openrlhf=={REQUIRED_OPENRLHF}"
        )
    return installed
