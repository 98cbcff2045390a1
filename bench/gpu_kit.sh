#!/usr/bin/env bash
# Packs what a bare GPU machine's Python (3.12 with torch, transformers, accelerate, peft, onnx already there) lacks
# to run `runner run`, tests/gpu and bench/gpu_check.sh, for one that cannot reach a package index:
# .gpu/gpusite.tar.xz, to unpack there with `mkdir -p /tmp/site && tar -xJf .gpu/gpusite.tar.xz -C /tmp/site` and
# use with PYTHONPATH=/tmp/site:$PWD:$PWD/tests. About 40 MB: Ray without its Java jars, dashboard build, RLlib,
# Serve and LLM; bitsandbytes with its CUDA 13 libraries only.
#   bench/gpu_kit.sh [PYTHON_VERSION=3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}  # needs torch to build DeepSpeed
work=$(mktemp -d)
plat="--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp $plat \
  -d "$work/whl" ray==2.60.0 datasets==5.2.0 dill multiprocess pydantic==2.14.4 pydantic-core annotated-types \
  typing-inspection cronsim jsonschema jsonschema-specifications referencing rpds-py hjson bitsandbytes==0.50.2
# DeepSpeed ships as source only: built here into a pure-Python wheel (its ops compile on first use there)
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$work/src" deepspeed==0.19.8
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$work/whl" "$work"/src/deepspeed-*.tar.gz
"$PY" - "$work" <<'PY'
import os, sys, zipfile, glob
work = sys.argv[1]
site = os.path.join(work, "site")
for w in glob.glob(os.path.join(work, "whl", "*.whl")):
    with zipfile.ZipFile(w) as z:
        for info in z.infolist():
            path = z.extract(info, site)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(path, mode)  # Ray's gcs_server and raylet must stay executable
PY
site="$work/site"
rm -rf "$site"/ray/jars "$site"/ray/dashboard/client/build "$site"/ray/rllib "$site"/ray/serve "$site"/ray/llm
find "$site/bitsandbytes" -name 'libbitsandbytes_*' ! -name '*cuda13*' ! -name '*cpu*' -delete
mkdir -p .gpu
tar -C "$site" -cJf .gpu/gpusite.tar.xz .
rm -rf "$work"
ls -l .gpu/gpusite.tar.xz
