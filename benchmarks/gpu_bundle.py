"""The bundle that travels to a lent GPU machine (it reaches no package registry), and a CPU rehearsal of its install.

``build`` writes, under ``--out`` (default ``build/gpu_bundle``, ignored by git, named in the device
tool's ``carry``):

- ``wheels/``: what the GPU image lacks for ``benchmarks/gpu_check.sh``: DeepSpeed built here as a
  pure-Python wheel with its ops off (``DS_BUILD_OPS=0``: ops JIT-compile on first use, and the
  recipes' ``torch_adam`` needs none), and the wheels of its and the data path's missing dependencies
  (:data:`CARRIED`) for CPython 3.12 on manylinux x86-64, the image's Python, at the versions this
  checkout's environment runs. Ray is not carried (hundreds of MB): the GPU check trains with
  ``data.loader=local``.
- ``shards/``: ``train`` and ``heldout`` shards built from ``../shared/data`` by the project's own
  builder (the command of ``benchmarks/real_data.sh``); the raw data is larger than the carry limit
  and ``../shared`` does not travel.
- ``MANIFEST.json``: the files, their sizes and the total, which must stay under ``--max-mb`` (the
  device tool carries at most 64 MiB, the rest of the working tree included).

``simulate`` rehearses the install on CPU: a fresh virtual environment that sees only the packages
the GPU image holds (:data:`IMAGE_PACKAGES`, linked from this checkout's environment), into which
the bundle's wheels are installed with the very command the GPU check runs
(``pip install --no-index --no-deps --target``). A wheel built for another interpreter than this
one (``pydantic-core``'s cp312 build) is checked for its tag and stood in for by this environment's
copy of the same version. Prints the ``PYTHONPATH`` under which that environment imports the bundle.

    python benchmarks/gpu_bundle.py build
    python benchmarks/gpu_bundle.py simulate --env build/gpu_sim
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
# Distributions the GPU check imports that the GPU image lacks (DeepSpeed itself is built, not fetched).
CARRIED = (
    "hjson",  # deepspeed
    "pydantic",  # deepspeed
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "webdataset",  # the shard reader
    "braceexpand",
    "fair-esm",  # ESM-2
)
# Python packages of the GPU image 'cuda' (/work/.library/device/KINDS.md, as read on 2026-11-17), those of
# them this project's environment also has; the rehearsal environment sees these and nothing else.
IMAGE_PACKAGES = (
    "accelerate aiohttp certifi charset-normalizer click cloudpickle einops filelock fsspec h5py hf-xet "
    "huggingface-hub idna jinja2 joblib markupsafe matplotlib contourpy cycler fonttools kiwisolver pillow "
    "pyparsing python-dateutil six mpmath msgpack networkx ninja numpy packaging pandas protobuf psutil "
    "py-cpuinfo pyarrow pytest pluggy iniconfig pygments pytest-timeout pytest-xdist execnet pyyaml regex "
    "requests safetensors scipy scikit-learn threadpoolctl sympy tensorboard tensorboard-data-server "
    "tokenizers torch torch-geometric tqdm transformers triton typing-extensions urllib3 werkzeug markdown "
    "absl-py grpcio typer shellingham rich markdown-it-py mdurl annotated-doc httpx httpcore h11 anyio "
    "sniffio setuptools wheel pip attrs frozenlist multidict yarl propcache aiosignal aiohappyeyeballs "
    "xxhash lxml"
).split()
TARGET_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
DATA = REPO.parent / "shared" / "data"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True, **kw)


def build_wheels(out: Path) -> list[Path]:
    """DeepSpeed's pure-Python wheel and the :data:`CARRIED` wheels for the GPU image, in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    version = md.version("deepspeed")
    if not list(out.glob(f"deepspeed-{version}-*.whl")):
        sdist = out.parent.parent / "gpu_bundle_sdist"  # not carried
        _run([*pip, "download", "--no-deps", "--no-binary", ":all:", "-d", str(sdist), f"deepspeed=={version}"])
        env = {**os.environ, "DS_BUILD_OPS": "0", "DS_ACCELERATOR": "cpu"}
        (tarball,) = sdist.glob(f"deepspeed-{version}.tar.gz")
        _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(tarball)], env=env)
    for name in CARRIED:
        spec = f"{name}=={md.version(name)}"
        if list(out.glob(f"{_norm(name).replace('-', '_')}-{md.version(name)}-*.whl")):
            continue
        plats = [a for p in TARGET_PLATFORMS for a in ("--platform", p)]
        _run(
            [*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
            + [*plats, "-d", str(out), spec]
        )
    return sorted(out.glob("*.whl"))


def build_shards(out: Path, data: Path) -> None:
    """``python -m data_shards build`` on ``data`` (as ``benchmarks/real_data.sh``): ``out/train``, ``out/heldout``."""
    if (out / "train" / "manifest.json").is_file() and (out / "heldout" / "manifest.json").is_file():
        return
    if not (data / "structures").is_dir():
        raise SystemExit(f"gpu_bundle: {data}/structures not found: the shards are built from ../shared/data")
    a = data / "annotations"
    _run(
        [sys.executable, "-m", "data_shards", "build", "--out", str(out), "--structures", str(data / "structures")]
        + ["--annotations", str(a / "pdb_chains.tsv"), "--go-obo", str(a / "go-basic_2021-12-15.obo.gz")]
        + ["--workers", "2", "--split-heldout", "0.2", "--split-seed", "0", "--overwrite"],
        stdout=subprocess.DEVNULL,
    )


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def build(args: argparse.Namespace) -> int:
    out = args.out
    wheels = build_wheels(out / "wheels")
    build_shards(out / "shards", args.data)
    sizes = {str(p.relative_to(out)): _size(p) for p in [*wheels, out / "shards" / "train", out / "shards" / "heldout"]}
    total = sum(sizes.values())
    manifest = {"files": sizes, "total_bytes": total, "total_mib": round(total / MIB, 2)}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for name, size in sizes.items():
        print(f"{size / MIB:8.2f} MiB  {name}")
    print(f"{total / MIB:8.2f} MiB  bundle total ({out})")
    if total > args.max_mb * MIB:
        print(f"gpu_bundle: the bundle is {total / MIB:.1f} MiB, over --max-mb {args.max_mb}", file=sys.stderr)
        return 1
    return 0


def _dist_paths(dist: md.Distribution, site: Path) -> set[Path]:
    """The top-level entries of ``site`` that a distribution installed (packages, modules, its dist-info)."""
    tops = set()
    for f in dist.files or []:
        parts = Path(f).parts
        if parts and parts[0] != ".." and (site / parts[0]).exists():
            tops.add(site / parts[0])
    return tops


def _image_closure() -> set[str]:
    """:data:`IMAGE_PACKAGES` and, transitively, what this environment's versions of them require.

    The image's own versions satisfy their own requirements there; here newer versions may need more
    (``huggingface-hub`` needs ``httpx2``), and those stand in for what the image has.
    """
    installed = {_norm(d.metadata["Name"]): d for d in md.distributions()}
    todo, seen = [n for n in IMAGE_PACKAGES if n in installed], set()
    while todo:
        name = todo.pop()
        if name in seen or name in CARRIED:  # the bundle brings those: the image has none of them
            continue
        seen.add(name)
        for req in installed[name].requires or []:
            if "extra ==" in req:
                continue
            dep = _norm(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
            if dep in installed:
                todo.append(dep)
    return seen


def _wheel_fits_here(wheel: Path) -> bool:
    tag = wheel.stem.split("-")[-3:]  # python, abi, platform
    if any(t.startswith("py3") for t in tag[0].split(".")) and tag[2] == "any":
        return True
    return tag[0] == f"cp{sys.version_info.major}{sys.version_info.minor}"


def simulate(args: argparse.Namespace) -> int:
    """A venv seeing the image's packages plus the bundle installed as on the GPU machine; prints its PYTHONPATH."""
    env, wheels = args.env.resolve(), sorted((args.bundle / "wheels").glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu_bundle: no wheels under {args.bundle}/wheels (run: benchmarks/gpu_bundle.py build)")
    shutil.rmtree(env, ignore_errors=True)
    image, target = env / "image_site", env / "site"
    image.mkdir(parents=True)
    site = Path(md.distribution("torch").locate_file(""))
    linked = 0
    for dist in md.distributions():
        if _norm(dist.metadata["Name"]) in _image_closure():
            for top in _dist_paths(dist, site):
                if not (image / top.name).exists():
                    (image / top.name).symlink_to(top)
                    linked += 1
    _run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(env / "venv")])
    base = (env / "venv").resolve()
    vsite = next(base.glob("lib/python3*/site-packages"))
    (vsite / "gpu_image.pth").write_text(f"{image}\n")
    fit = [w for w in wheels if _wheel_fits_here(w)]
    # The GPU check's own install command (benchmarks/gpu_check.sh), here with this checkout's pip.
    _run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
        + ["--upgrade", "--target", str(target), *map(str, fit)]
    )
    for wheel in wheels:
        if wheel in fit:
            continue
        name, version, py, _abi, plat = wheel.stem.split("-")[:5]
        if py != "cp312" or not any(p in plat for p in TARGET_PLATFORMS):
            raise SystemExit(f"gpu_bundle: {wheel.name} is not a CPython 3.12 manylinux x86-64 wheel")
        dist = md.distribution(name)
        if dist.version != version:
            raise SystemExit(f"gpu_bundle: {wheel.name}: this environment has {name} {dist.version}, not {version}")
        for top in _dist_paths(dist, site):  # this interpreter's build of the same version stands in
            (target / top.name).symlink_to(top)
        print(f"stand-in for {wheel.name}: this environment's {name} {version}", flush=True)
    print(f"linked {linked} entries of the image's packages; bundle installed in {target}", flush=True)
    print(f"PYTHON={base / 'bin' / 'python'}")
    print(f"PYTHONPATH={REPO}:{target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the bundle: wheels, shards, MANIFEST.json")
    b.add_argument("--out", type=Path, default=REPO / "build" / "gpu_bundle")
    b.add_argument("--data", type=Path, default=DATA, help="the real data the shards are built from")
    b.add_argument("--max-mb", type=float, default=56.0, help="largest bundle allowed, MiB (64 with the tree)")
    s = sub.add_parser("simulate", help="install the bundle into a venv that sees only the GPU image's packages")
    s.add_argument("--bundle", type=Path, default=REPO / "build" / "gpu_bundle")
    s.add_argument("--env", type=Path, default=REPO / "build" / "gpu_sim")
    args = p.parse_args(argv)
    return build(args) if args.command == "build" else simulate(args)


if __name__ == "__main__":
    sys.exit(main())
