#!/usr/bin/env bash
# A wheelhouse for offline / air-gapped hosts: easel's wheel and every dependency of the
# core and the extras named, for one Python version and platform, except torch and what
# only torch needs (torchvision, triton, nvidia-*): the host brings its own torch >= 2.11
# (GPU base images ship one). Install there with
#
#   pip install --no-index --find-links WHEELHOUSE 'easel[diffusers]'
#
# usage: bash scripts/wheelhouse.sh [-o DIR] [-p PYTHON_VERSION] [-P PLATFORM] [-e EXTRAS]
#   defaults: -o wheelhouse -p 3.11 -P manylinux_2_28_x86_64 -e diffusers (-e '' : the core only)
# pip reads this machine's pip configuration (index URL, CA bundle) to fetch the wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
out=wheelhouse py=3.11 platform=manylinux_2_28_x86_64 extras=diffusers
while getopts "o:p:P:e:" opt; do
  case $opt in
    o) out=$OPTARG ;; p) py=$OPTARG ;; P) platform=$OPTARG ;; e) extras=$OPTARG ;;
    *) sed -n '9,11p' "$0" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
pip=(python3 -m pip --disable-pip-version-check -q)
target=(--only-binary=:all: --implementation cp --python-version "$py" --platform "$platform")
# pip takes the platform tag literally: a manylinux_2_N host also runs every older manylinux wheel
if [[ $platform =~ ^manylinux_2_([0-9]+)_(.+)$ ]]; then
  for ((m = BASH_REMATCH[1] - 1; m >= 5; m--)); do target+=(--platform "manylinux_2_${m}_${BASH_REMATCH[2]}"); done
  target+=(--platform "manylinux2014_${BASH_REMATCH[2]}" --platform "manylinux2010_${BASH_REMATCH[2]}" --platform "manylinux1_${BASH_REMATCH[2]}")
fi

src=$(mktemp -d)
report=$(mktemp)
never=$(mktemp -d)  # pip wants --target with platform options; --dry-run writes nothing there
trap 'rm -rf "$src" "$report" "$never"' EXIT
cp -r pyproject.toml README.md server clients static "$src/"  # a copy: building leaves build/ beside the sources
"${pip[@]}" wheel --no-deps --no-build-isolation -w "$out" "$src"
version=$(python3 -c 'import tomllib, sys; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' pyproject.toml)

# resolve for the target (nothing installed), then fetch each wheel but torch's
"${pip[@]}" install --dry-run --ignore-installed --report "$report" "${target[@]}" --target "$never" \
  --find-links "$out" "easel${extras:+[$extras]}==$version"  # PyPI has another project named easel
mapfile -t pins < <(python3 - "$report" <<'EOF'
import json, re, sys
SKIP = re.compile(r"^(easel|torch|torchvision|torchaudio|triton|nvidia-.*)$")
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if not SKIP.match(re.sub(r"[-_.]+", "-", name).lower()):
        print(f"{name}=={version}")
EOF
)
if [ "${#pins[@]}" -gt 0 ]; then
  "${pip[@]}" download --no-deps "${target[@]}" -d "$out" "${pins[@]}"
fi
echo "wheelhouse: $out ($(ls "$out" | wc -l) wheels, $(du -sh "$out" | cut -f1)) for CPython $py on $platform" >&2
