"""`python -m openrlhf_ext.export CKPT_DIR OUT_DIR [--tag global_stepN]`: an OpenRLHF checkpoint to a HF model folder.

Accepts `--ckpt.path` (holding `_actor/` and maybe `global_stepN_hf/`) or the `_actor` folder itself.
A ready `global_stepN_hf` folder is copied as is; otherwise the ZeRO shards are consolidated with
DeepSpeed's own `zero_to_fp32` and saved with `save_pretrained` (safetensors) together with the config
and tokenizer of `--base-model` (the DeepSpeed checkpoint carries neither). The output folder appears
atomically: it is written beside OUT_DIR and renamed into place.

`zero_to_fp32` reads the shards with `torch.load(weights_only=False)`, i.e. it unpickles them: export only
checkpoints you (or your own training run) wrote. The tag (`--tag` or the `latest` file) must be a plain
folder name, so a crafted `latest` cannot point the loader outside the checkpoint folder.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

from reward_plugins.io import current_umask

_STEP = re.compile(r"^global_step(\d+)$")
DTYPES = ("float32", "bfloat16", "float16")


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked; the message names the folder or key."""


def deepspeed_dir(ckpt_dir: Path) -> Path:
    """The folder holding `global_stepN/` and `latest`: `<ckpt.path>/_actor`, or `ckpt_dir` itself."""
    return ckpt_dir / "_actor" if (ckpt_dir / "_actor").is_dir() else ckpt_dir


_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def plain_tag(tag: str, where: str) -> str:
    """`tag` if it is a plain folder name (no path separator, no `..`); the checkpoint loader joins it to the folder."""
    if not _PLAIN_NAME.match(tag) or ".." in tag:
        raise ExportError(f"{where}: checkpoint tag {tag!r} is not a plain folder name; refusing to follow it")
    return tag


def resolve_tag(ds_dir: Path, tag: str | None = None) -> str:
    """`tag` if given, else the one named in `latest`, else the highest `global_stepN` folder."""
    if tag:
        return plain_tag(tag, "--tag")
    latest = ds_dir / "latest"
    if latest.is_file():
        return plain_tag(latest.read_text().strip(), str(latest))
    steps = [(int(m.group(1)), p.name) for p in ds_dir.glob("global_step*") if p.is_dir() and (m := _STEP.match(p.name))]
    if not steps:
        raise ExportError(f"{ds_dir}: no 'latest' file and no global_stepN folder; pass --tag")
    return max(steps)[1]


def hf_folder(ckpt_dir: Path, tag: str) -> Path | None:
    """The ready-to-load `<ckpt.path>/<tag>_hf` folder OpenRLHF writes with `--ckpt.save_hf`, if present."""
    root = ckpt_dir.parent if ckpt_dir.name == "_actor" else ckpt_dir
    folder = root / f"{tag}_hf"
    return folder if (folder / "config.json").is_file() else None


def export_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    tag: str | None = None,
    base_model: str | Path | None = None,
    dtype: str = "float32",
    prefer_hf: bool = True,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write a loadable HF model folder for `tag` of `ckpt_dir` at `out_dir`; return `out_dir`."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists; pass --overwrite to replace it")
    ds_dir = deepspeed_dir(ckpt_dir)
    tag = resolve_tag(ds_dir, tag)
    ready = hf_folder(ckpt_dir, tag) if prefer_hf else None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the exported folder gets the usual mode
    try:
        if ready is not None:
            shutil.copytree(ready, staging, dirs_exist_ok=True)
            source = {"kind": "hf_checkpoint", "path": str(ready)}
        else:
            _consolidate(ds_dir, tag, staging, base_model, dtype, max_shard_size)
            source = {"kind": "deepspeed_zero", "path": str(ds_dir), "base_model": str(base_model), "dtype": dtype}
        (staging / "export_info.json").write_text(json.dumps({"tag": tag, **source}, indent=2) + "\n")
        _replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _consolidate(ds_dir: Path, tag: str, staging: Path, base_model, dtype: str, max_shard_size: str) -> None:
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    base = Path(base_model) if base_model else None
    if base is None or not (base / "config.json").is_file():
        raise ExportError(
            f"{ds_dir}/{tag} holds weights only; pass --base-model, a folder with the policy's config.json and tokenizer"
        )
    if not (ds_dir / tag).is_dir():
        raise ExportError(f"{ds_dir}: no checkpoint folder {tag!r}")
    state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = set(model.state_dict())
    tied = {key for key in expected - set(state) if _is_tied(model, key)}
    missing, unexpected = sorted(expected - set(state) - tied), sorted(set(state) - expected)
    if missing or unexpected:
        raise ExportError(
            f"{ds_dir}/{tag} does not match {base}/config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(base).save_pretrained(staging)


def _is_tied(model, key: str) -> bool:
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    output = model.get_output_embeddings()
    return output is not None and key.startswith(_module_name(model, output))


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _replace(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openrlhf_ext.export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt_dir", help="OpenRLHF --ckpt.path, or its _actor folder")
    parser.add_argument("out_dir", help="the Hugging Face model folder to write")
    parser.add_argument("--tag", help="global_stepN (default: the 'latest' file, else the highest step)")
    parser.add_argument("--base-model", help="folder with the policy's config.json and tokenizer (for ZeRO shards)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype of the export (default float32)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--from-zero", action="store_true", help="consolidate the ZeRO shards even if <tag>_hf exists")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(
            args.ckpt_dir,
            args.out_dir,
            tag=args.tag,
            base_model=args.base_model,
            dtype=args.dtype,
            prefer_hf=not args.from_zero,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
    except ExportError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
