"""Pack the GPU check's kit (called by scripts/gpu_kit.sh; standard library only).

Each requested wheel is found in ``--wheels`` and rewritten uncompressed (``ZIP_STORED``: the same members and bytes,
so its RECORD hashes still hold), except that comfy-kitchen loses its two compiled extensions (see gpu_kit.sh). The
wheels go into one ``wheels.tar.xz`` and the ComfyUI tree, without its tests, into ``comfyui-<version>.tar.xz``;
``manifest.json`` records every file's size and sha256, what was dropped, and the totals against ``--limit-mib``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

#: members left out of a wheel, by distribution (normalized name), with the reason recorded in the manifest
DROP = {
    "comfy_kitchen": {
        "members": ("comfy_kitchen/backends/cuda/_C.abi3.so", "comfy_kitchen/backends/hip/_C.abi3.so"),
        "reason": "compiled CUDA and HIP kernels (235 MB unpacked, 58 MB as a wheel): over the size limit; "
                  "comfy-kitchen loads without them and ComfyUI uses its triton / eager backends",
    },
}
#: parts of the ComfyUI tree that the check never runs
TREE_EXCLUDE = {".git", "tests", "tests-unit", "__pycache__", ".github", "extra_model_paths.yaml"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def find_wheel(folder: Path, requirement: str) -> Path:
    name, _, version = requirement.partition("==")
    hits = [p for p in folder.glob("*.whl")
            if norm(p.name.split("-")[0]) == norm(name) and p.name.split("-")[1] == version]
    if len(hits) != 1:
        raise SystemExit(f"gpu_kit: expected one wheel of {requirement} in {folder}, found {[h.name for h in hits]}")
    return hits[0]


def repack(src: Path, dst: Path, drop: tuple[str, ...]) -> list[str]:
    """``src`` rewritten into ``dst`` with every member stored, less ``drop`` (and their RECORD lines)."""
    dropped = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename in drop:
                dropped.append(info.filename)
                continue
            data = zin.read(info)
            if drop and info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(ln for ln in lines if ln.split(",")[0] not in drop).encode()
            out = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            out.external_attr = info.external_attr
            out.compress_type = zipfile.ZIP_STORED
            zout.writestr(out, data)
    missing = set(drop) - set(dropped)
    if missing:
        raise SystemExit(f"gpu_kit: {src.name} has no {sorted(missing)} (a new version? update DROP)")
    return dropped


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tar_xz(out: Path, items: list[tuple[Path, str]], exclude=frozenset()) -> None:
    """``(path, name in the archive)`` pairs into ``out`` (xz -6; every core when the xz command is there),
    leaving out any entry with a path part in ``exclude``."""
    def keep(ti: tarfile.TarInfo):
        return None if any(p in exclude for p in Path(ti.name).parts) else ti

    buf = out.with_suffix("")  # the .tar
    with tarfile.open(buf, "w", format=tarfile.PAX_FORMAT) as tar:
        for path, name in items:
            tar.add(path, arcname=name, filter=keep)
    if shutil.which("xz"):
        subprocess.run(["xz", "-6", "-T0", "-f", str(buf)], check=True)
    else:
        import lzma
        with open(buf, "rb") as f, lzma.open(out, "wb", preset=6) as g:
            shutil.copyfileobj(f, g)
        buf.unlink()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheels", type=Path, required=True)
    ap.add_argument("--core", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit-mib", type=float, default=60)
    ap.add_argument("requirements", nargs="+")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "wheels"
        stage.mkdir()
        for req in args.requirements:
            src = find_wheel(args.wheels, req)
            dist = norm(req.partition("==")[0])
            drop = DROP.get(dist, {}).get("members", ())
            dst = stage / src.name
            dropped = repack(src, dst, drop)
            records.append({"requirement": req, "file": src.name, "bytes_downloaded": src.stat().st_size,
                            "bytes_in_kit": dst.stat().st_size, "sha256": sha256(dst),
                            **({"dropped": dropped, "reason": DROP[dist]["reason"]} if dropped else {})})
        tar_xz(args.out / "wheels.tar.xz", [(stage, "wheels")])
    version_file = (args.core / "comfyui_version.py").read_text()
    version = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version_file).group(1)
    core_name = f"comfyui-{version}"
    tar_xz(args.out / f"{core_name}.tar.xz", [(args.core, core_name)], exclude=TREE_EXCLUDE)
    files = {p.name: p.stat().st_size for p in sorted(args.out.iterdir()) if p.is_file()}
    total = sum(files.values())
    manifest = {
        "python": "3.12", "platform": "manylinux x86-64",
        "wheels": records,
        "comfyui": {"version": version, "source": str(args.core), "archive": f"{core_name}.tar.xz",
                    "excluded": sorted(TREE_EXCLUDE)},
        "left_out": {
            "comfyui-frontend-package": "22 MB; the check drives the server over HTTP (--front-end-root: an empty folder)",
            "comfyui-workflow-templates, comfyui-embedded-docs":
                "optional for ComfyUI (the frontend's template browser and node docs); it logs their absence",
            "comfy-angle, PyOpenGL": "only ComfyUI's GLSL nodes use them; those fail to import with a warning",
        },
        "bytes": {**files, "total": total}, "limit_bytes": int(args.limit_mib * 2 ** 20),
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"[gpu_kit] {len(records)} wheels: {files['wheels.tar.xz']} bytes; ComfyUI {version}: "
          f"{files[core_name + '.tar.xz']} bytes; total {total} bytes ({total / 2 ** 20:.1f} MiB)")
    if total > manifest["limit_bytes"]:
        print(f"gpu_kit: the kit is {total / 2 ** 20:.1f} MiB, over its limit of {args.limit_mib} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
