#!/usr/bin/env bash
# Downloads, on a networked machine, the wheels for an offline install of diffusers 0.42.1 on the lent GPU machine
# (no network there; benchmarks/gpu_check.sh installs them when diffusers is missing, for benchmarks/gpu_sd.py):
#
#   bash benchmarks/fetch_gpu_wheels.sh     # then run the GPU check with carry=["benchmarks/wheels"]
#
# Into benchmarks/wheels/ (gitignored), for CPython 3.11, 3.12 and 3.13 on x86_64 Linux (manylinux2014, and
# manylinux_2_28 for wheels built only so: the machine's torch wheels need glibc >= 2.28 anyway).  No Python 3.10:
# diffusers 0.42.1 requires Python >= 3.11.  Every wheel is fetched with --no-deps from the explicit list below
# (diffusers' requirements and huggingface_hub's, at the versions installed and tested with edmrt here), so torch,
# numpy and Pillow, which the GPU image has, never come along; nor does transformers (which diffusers needs for
# StableDiffusionPipeline): the GPU image has it, and gpu_sd.py says so when it is missing.  The carried wheels
# count towards the 64 MiB the device tool carries with the working tree: the total must stay under LIMIT_MIB.
# The script then checks, offline, that the folder plus the machine's numpy and Pillow resolves
# `pip install diffusers==0.42.1` for every Python version, and prints the total size.
set -euo pipefail
cd "$(dirname "$0")/.."

dest=benchmarks/wheels
LIMIT_MIB=24
pythons=(3.11 3.12 3.13)
platform_args=(--implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64)

# diffusers 0.42.1 requires importlib_metadata, filelock, huggingface-hub>=1.32,<3, numpy, regex, requests,
# safetensors>=0.8 and Pillow; below, all but numpy and Pillow, with what they require in turn.
wheels=(
  diffusers==0.42.1
  importlib-metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0
  filelock==4.3.1 regex==2026.5.9 safetensors==0.8.0
  requests==2.34.2 charset-normalizer==3.4.7 idna==3.20 urllib3==2.7.0 certifi==2026.5.20
  huggingface-hub==2.4.0 click==8.5.1 fsspec==2026.9.0 hf-xet==1.8.0 packaging==26.2 pyyaml==6.0.3 tqdm==4.70.1
  typing-extensions==4.16.0 httpx2==2.16.2 httpcore2==2.16.2 anyio==4.16.0 h11==0.16.0 truststore==0.10.5
)
# Stand-ins for what the GPU image provides, used only by the offline check below.
provided=(numpy==2.4.6 pillow==13.0.0)

mkdir -p "$dest"
rm -f -- "$dest"/*.whl
for py in "${pythons[@]}"; do
  echo "== wheels for Python $py"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" "${platform_args[@]}" \
    -d "$dest" "${wheels[@]}"
done

# Offline check: the folder, with stand-in wheels for numpy and Pillow, resolves the install for every Python.
tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT
mkdir -p "$tmp/stub"
python3 - "$tmp/stub" "${provided[@]}" <<'EOF'
import sys, zipfile
from pathlib import Path

for spec in sys.argv[2:]:
    name, version = spec.split("==")
    stem = f"{name}-{version}"
    with zipfile.ZipFile(Path(sys.argv[1]) / f"{stem}-py3-none-any.whl", "w") as z:
        z.writestr(f"{stem}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{stem}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n")
        z.writestr(f"{stem}.dist-info/RECORD", "")
EOF
for py in "${pythons[@]}"; do
  python3 -m pip install --quiet --dry-run --ignore-installed --no-index --find-links "$dest" \
    --find-links "$tmp/stub" --only-binary=:all: --python-version "$py" "${platform_args[@]}" \
    --target "$tmp/target" diffusers==0.42.1
  echo "offline resolution of diffusers==0.42.1 for Python $py: ok"
done

count=$(find "$dest" -name '*.whl' | wc -l)
bytes=$(du -cb "$dest"/*.whl | tail -n 1 | cut -f 1)
mib=$(( (bytes + 1048575) / 1048576 ))
echo "benchmarks/wheels: $count wheels, $bytes bytes (~$mib MiB; limit $LIMIT_MIB MiB)"
if (( mib > LIMIT_MIB )); then
  echo "too large to carry with the working tree: drop a Python version or what the GPU image already has" >&2
  exit 1
fi
