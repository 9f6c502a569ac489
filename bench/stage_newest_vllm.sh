#!/usr/bin/env bash
# Stage vLLM 0.33.0 (torch 2.14.0+cu130) for the lent GPU machine. Runs HERE (CPU machine), from anywhere;
# it works in the project root. Nothing tracked is changed: it writes the git-ignored folders
# .v3300 .. .v33NN (wheel parts and small wheels, each folder <= ${PART_BYTES:-37000000} bytes) and .v33z
# (install.sh + manifest.sha256), using the download cache ${VLLM033_WHEEL_CACHE:-/tmp/vllm033-wheels}.
# With the tree slimmed for the stretch (bash bench/device_tree.sh slim: 3.4 MB travels with each call
# instead of 25.6), PART_BYTES=62500000 makes about 45 calls instead of 74.
#
# Wheels: 60 files, 2,696,972,022 bytes in all (MANIFEST below: file, bytes, sha256). Beyond the image
# (torch 2.11.0+cu130, triton 3.6.0, CUDA 13.0 libs): vllm 0.33.0, torch 2.14.0 (+cu130 build on PyPI),
# triton 3.8.0 (torch 2.14 pins ~=3.8.0), the CUDA libs whose pins changed from torch 2.11 (nvidia-cublas
# 13.1.0.3->13.1.1.3, nvidia-cudnn-cu13 9.19.0.56->9.24.0.43, nvidia-cusparselt-cu13 0.8.0->0.8.1,
# nvidia-nccl-cu13 2.28.9->2.30.7, cuda-toolkit meta 13.0.2->13.0.3; cudart/nvrtc/cufft/... and nvshmem
# 3.4.5 are unchanged and come from the image), the vLLM 0.26 extras (same pins) except flashinfer_python
# 0.7.2.post1, apache_tvm_ffi 0.1.11, xgrammar 0.2.8, oss_harmony 0.0.11 (replaces openai_harmony; same
# module name), plus torchvision 0.29.0 (pins torch==2.14.0: the image's torchvision would not load its ops
# under torch 2.14), nvidia_cutlass_dsl(+libs_cu13) 4.8.0 and nvidia_cudnn_frontend 1.32.0 (vLLM 0.33 /
# flashinfer 0.7 raised their floors; the image's copies are of unknown version).
#
# Device calls after running this script (74 in all; 45 with PART_BYTES=62500000, measured 2026-11-30;
# run them back to back so the machine stays warm):
#   1..73: carry [".v33NN"] (NN = 00 .. 72, in order), command: mkdir -p /root/w33 && cp .v33NN/* /root/w33/
#   74:    carry [".v33z"],  command: bash .v33z/install.sh
#   then:  export PYTHONPATH=/tmp/site33 && python3 your_script.py      (same warm machine, nothing carried)
# If /tmp/site33 is gone the machine is a fresh one: start again at call 1. (The script prints the
# actual folder count at the end; trust that if it differs from 73 + 1.)
#
# PYTHONPATH=/tmp/site33 must come BEFORE the image's site-packages (PYTHONPATH entries always do) so that
# torch 2.14 / triton 3.8 / torchvision 0.29 shadow the image's torch 2.11 / triton 3.6. Do not also put
# /tmp/site (vLLM 0.26) on the path: /tmp/site33 is self-contained (vllm, flashinfer, xgrammar, ... differ).
# Extra wheels (trl, datasets, ...) go into /tmp/site33 too, with --no-deps, never another torch.
#
# How torch 2.14 finds its CUDA libs there (checked in torch 2.14's __init__.py, _load_global_deps):
# torch/lib/libtorch_global_deps.so and libtorch_cuda.so carry RPATH $ORIGIN/../../nvidia/{cudnn,nvshmem,
# nccl,cusparselt,cu13}/lib, i.e. /tmp/site33/nvidia/... . libcudart.so.13 is not in /tmp/site33, so
# (unless the image has it on the loader path) the first dlopen fails and torch falls back to
# _preload_cuda_deps(), which walks sys.path IN ORDER and dlopens, per library, the first
# <entry>/nvidia/{cublas|cudnn|nccl|...|cu13}/lib match: /tmp/site33 wins for cublasLt/cublas, cudnn,
# cusparseLt, nccl; the rest (cudart, nvrtc, cupti, cufft, curand, cusolver, cusparse, nvjitlink,
# nvshmem, cufile) resolve from the image's site-packages/nvidia. If the first dlopen succeeds, the same
# walk runs best-effort (required=False) before torch._C loads, with the same effect. So the nvidia libs
# need NOT be beside torch as long as /tmp/site33 precedes site-packages; they must all be installed in
# ONE pip call (they share the nvidia/ folder; --target moves top-level folders as a whole).
# install.sh prints which libcudnn/libnccl/libcublas files got mapped: check they are under /tmp/site33.
# Caveats: compiled packages in the image built against torch 2.11 (torchaudio, flash_attn, xformers,
# torchao, ...) may fail to import under torch 2.14; vLLM imports these only inside try/optional paths.
# Packages left out on purpose (not on the plain text-generation import path; image versions unknown):
# tilelang, quack-kernels, tokenspeed-mla, humming-kernels, instanttensor, numba==0.65 (ngram spec decode),
# mcp, anthropic, opentelemetry, mistral_common, torchaudio, torchcodec, PyNvVideoCodec, nvtx. (The serve path
# imports orjson and model_hosting_container_standards, which imports jmespath: brought, found by an import
# smoke test of 0.33 on the CPU machine.)
# vLLM 0.33 floors the image may not meet: huggingface_hub>=1.31, tokenizers>=0.23.2, requests>=2.33,
# aiohttp>=3.14.4, pillow>=13 (not brought; add here if an import fails).
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${VLLM033_WHEEL_CACHE:-/tmp/vllm033-wheels}"
limit="${PART_BYTES:-37000000}"  # 62500000 with the tree slimmed (bash bench/device_tree.sh slim)
mkdir -p "$cache"
manifest="$cache/MANIFEST.txt"
cat > "$manifest" <<'MANIFEST'
annotated_types-0.8.0-py3-none-any.whl 13427 f072f4d804ea359e4eaf198b1af7a8b0943881a87f31bb764f8bf219bb9419e0
apache_tvm_ffi-0.1.11-cp312-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl 2697683 2843f084cdc94dedacd8b257a395a2b71b8a3dc7fc99711b148bf1d161983128
astor-0.8.1-py2.py3-none-any.whl 27488 070a54e890cefb5b3739d19f30f5a5ec840ffc9c50ffa7d23cc9fc1a38ebbfc5
blake3-1.0.11-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl 381348 33424c686b291c7682b5816fe9320466dbc0a457ef7e15c273c804a2d70fea70
cachetools-8.0.2-py3-none-any.whl 19334 502bf3c17c6e35d78ccdaa70da8c7001b28634541f5cde0dee33c93bb252277d
cbor2-6.3.0-cp312-cp312-manylinux_2_28_x86_64.whl 473147 4f160b662059cc30ced4436fca332f4c27d0259698a5bde8373c9c6f829aabdf
cffi-2.1.1-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 221822 c1453022f490d2459a11819d83ad1d586e9ff65a12ac3e705ffebd46d3685dcf
compressed_tensors-0.17.0-py3-none-any.whl 211714 4a1b89b508f7efb8ffb4eee8a6e69e0452d9b080cae130146025c64fbe9fa9aa
cuda_toolkit-13.0.3.0-py2.py3-none-any.whl 2512 d693caaa261214ddd7dbb60d68e71cbed884e68c2be7509778f3051da0b91c3f
depyf-0.20.0-py3-none-any.whl 39381 d31effad4261cebecb58955d832e448ace88f432328f95f82fd99c30fd9308d4
dill-0.4.1-py3-none-any.whl 120019 1e1ce33e978ae97fcfcff5638477032b801c46c7c65cf717f95fbc2248f79a9d
distro-1.9.0-py3-none-any.whl 20277 7bffd925d65168f85027d8da9af6bddab658135b840670a223589bc0c8ef02b2
fastapi-0.136.3-py3-none-any.whl 117481 3d2a69bdf04b7e9f3afa292c3bc7a98816bbfafa10bc9b45f3f3700d2f761620
flashinfer_python-0.7.2.post1-py3-none-any.whl 62052965 bfdc18b9e1e4d8d0730fe4343dc0e284cd0c160086de80f99888bc4867922d49
h11-0.16.0-py3-none-any.whl 37515 63cf8bbe7522de3bf65932fda1d9c2772064ffb3dae62d55932da54b31cb6c86
ijson-3.6.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl 150188 c14d568d31a322e8ed7e9735f6e355608a23cc6ff4b5da843515089dae4cbf5f
interegular-0.3.3-py37-none-any.whl 23635 b0c07007d48c89d6d19f7204972d369b2a77222722e126b6aa63aa721dc3b19c
jiter-0.19.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 338071 0956b5f58b804221dfb929c120e6d4032138fed20c1cc0ef683a2d1326255e46
jmespath-1.1.0-py3-none-any.whl 20419 a5663118de4908c91729bea0acadca56526eb2698e83de10cd116ae0f4e97c64
jsonschema-4.26.0-py3-none-any.whl 90630 d489f15263b8d200f8387e64b4c3a75f06629559fb73deb8fdfb525f2dab50ce
jsonschema_specifications-2025.9.1-py3-none-any.whl 18437 98802fee3a11ee76ecaca44429fda8a41bff98b00a0f2838151b113f210cc6fe
lark-1.2.2-py3-none-any.whl 111036 c2276486b02f0f1b90be155f2c8ba4a8e194d42775786db622faccd652d8e80c
llguidance-1.7.6-cp39-abi3-manylinux_2_31_x86_64.whl 3074809 ceec951d29a74309984e3be0fe7f5f56c1362434cd937abd517b259a60908b1e
lm_format_enforcer-0.11.3-py3-none-any.whl 45418 cf586350875def1ae7a8fba84fcbbfc8371424b6c9d05c1fcba70aa233fbf06f
loguru-0.7.3-py3-none-any.whl 61595 31a33c10c8e1e10422bfd431aeb5d351c7cf7fa671e3c4df004162264b28220c
model_hosting_container_standards-0.1.16-py3-none-any.whl 125666 47f4f65713120bc3a69feb022981a38db9e557aedf88dbd72077f20588caa12b
msgspec-0.22.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl 230377 99c401861c5bb3a57f7d6423ea7ed4352cd57aa3f04f4fbe9f3e3e4564a10f08
nvidia_cublas-13.1.1.3-py3-none-manylinux_2_27_x86_64.whl 423138758 37936a16db8fe4ac1f065c2139360608a543a09275cb1a1af612e08cfa065436
nvidia_cudnn_cu13-9.24.0.43-py3-none-manylinux_2_27_x86_64.whl 553099438 71f181cd810e90f9b6023b01186fe82d13d65f0ec098581ee201d39fad769e4b
nvidia_cudnn_frontend-1.32.0-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl 11619860 8b354a8e550c083eb247f1eb39a7d69a4a269075f5a01e4fcbd2531680b17239
nvidia_cusparselt_cu13-0.8.1-py3-none-manylinux2014_x86_64.whl 170148586 786ce87568c303fadb5afcc7102d454cd3040d75f6f8626f5db460d1871f4dd0
nvidia_cutlass_dsl-4.8.0-py3-none-any.whl 10493 24f996e0e5fa88c8b417f4893e615af135bdfdfdbdbed7e239faf36a88df711b
nvidia_cutlass_dsl_libs_cu13-4.8.0-cp312-cp312-manylinux_2_28_x86_64.whl 91950801 463cd7f0c452ffeeecb530a15aeb1b10cbbd2c8da6c5aa2fecf65f836258a732
nvidia_nccl_cu13-2.30.7-py3-none-manylinux_2_18_x86_64.whl 215965170 cefa7fdb9710efd0f39c5f1be1d61ff6fc9a996c451265bd7fbdcf9455ed4b50
openai-2.54.0-py3-none-any.whl 1660351 89089789197ccdb87f173a03145ed1598d00795220c93e96cf712b1cbf5e5f2b
orjson-3.13.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl 130612 bceadfd314bd238f584fc229a4bbaf0e573597e7a026dec5429fbf29fd66c641
oss_harmony-0.0.11-cp38-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl 3567858 d877c6b526cdbdf55068bae8f05c60398e929c9e296c7f69a1d533339708be80
outlines_core-0.2.14-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl 2341426 3bb2060c240c4507f334965a8948dbeeb22007560d797f6debd92346c0b620cb
partial_json_parser-0.2.1.1.post7-py3-none-any.whl 10877 145119e5eabcf80cbb13844a6b50a85c68bf99d376f8ed771e2a3c3b03e653ae
prometheus_fastapi_instrumentator-8.1.0-py3-none-any.whl 19649 b9f40b2cff3f7891ca0610b3ae4fc6ec723fd326b04bb659819aaeb821a0fc7d
pybase64-1.5.1-cp312-cp312-manylinux1_x86_64.manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_5_x86_64.whl 94689 c212d02fd072c5845d39b4699eb65efa827b79a5cf7fecc9f468f8cad2b8540f
pydantic-2.14.4-py3-none-any.whl 494865 653a2ad9f6d8858529c77c72717d0ea991d6c6837fe683246b2f4b2bbfc3fadc
pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 2264846 470bbc2495367f60d3ca849a8039e4c164701d10637e7743f4427d92651bdb6d
python_json_logger-4.2.0-py3-none-any.whl 14988 158a52126fcd6869e09574d2b66272666f3dc8f468c62637ef9a1fa883719cb9
python_multipart-0.0.34-py3-none-any.whl 32585 ebacd224bd686eee2f9aa1066a657affe07435a185834e05e5235e2e59173e91
pyzmq-27.3.0-cp312-abi3-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl 855178 858fe25231e0fd8612da142efde019faa5ef63fa150a821a27870e791b38c798
referencing-0.37.0-py3-none-any.whl 26766 381329a9f99628c9069361716891d34ad94af76e461dcb0335825aecc7692231
rpds_py-2026.9.1-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl 371261 addeda51556dac7c1a2f14cda62db8b621cd12afba3091d03a96c72932387eab
setproctitle-1.3.8-cp312-cp312-manylinux1_x86_64.manylinux_2_28_x86_64.manylinux_2_5_x86_64.whl 32929 4a765e0c80a2453480be27c4fc22ba1c0771867040c5f91e4221940d78a4abfb
sniffio-1.3.1-py3-none-any.whl 10235 2f6da418d1f1e0fddd844478f41680e794e6051915791a034ff65e5f100525a2
starlette-1.10.0-py3-none-any.whl 80571 478c0ab3b4ced6e82719849c118fa406f0278a3499c1a898cd15cd31bdc38ce4
torch-2.14.0-cp312-cp312-manylinux_2_28_x86_64.whl 554620488 fecffb58f51fd643d213acd68da21cc3fc19bea05a3bc64b4ee55128f47a4963
torchvision-0.29.0-cp312-cp312-manylinux_2_28_x86_64.whl 7430773 0e631a2f8b24732672d35224d2574ff89a78d56bef5364ef6094a625fa5f1771
triton-3.8.0-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl 247972921 e91ffa46d095b252248297292dd22bcbacd53a125a0c2eefbbbf74925a320bc3
typing_extensions-4.16.0-py3-none-any.whl 45571 481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8
typing_inspection-0.4.5-py3-none-any.whl 14874 bc210535442b39e1bf2805e0c7a17dfd6a4ace760c84c7f7d16245d23a6b1c39
uvicorn-0.54.0-py3-none-any.whl 87427 505bdb0f318731d45f1f712071fc781a8981f6847a31c902c9f5e652d4f67faf
vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl 336361138 4b6bdec4ab269990bf70d45a3c1e94c3760a27064513760193b26d6f0da883aa
watchfiles-1.3.0-cp310-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl 458353 b5768b49e426fd5b550b012c866db347cdf15c398ef98dc557b6e6b72fa74cd1
xgrammar-0.2.8-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl 1311291 4045b096735bb2523e0d874039a55994c1b390620d547c4a0d4f43b9a106177b
MANIFEST
plat=(--only-binary=:all: --python-version 3.12 --implementation cp)
for t in 2_39 2_38 2_36 2_35 2_34 2_31 2_28 2_27 2_26 2_24 2_18 2_17 2_5; do plat+=(--platform "manylinux_${t}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# 1. (re)download exactly these wheels (pip skips files already in the cache), then check every sha256.
specs=$(awk '{split($1,a,"-"); print a[1]"=="a[2]}' "$manifest")
missing=0; while read -r f _ _; do [ -f "$cache/$f" ] || missing=1; done < "$manifest"
if [ "$missing" = 1 ]; then
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$cache" $specs 2>&1 | { grep -v '^WARNING: Location' || true; }
fi
awk '{print $3"  "$1}' "$manifest" > "$cache/manifest.sha256"
( cd "$cache" && nice sha256sum -c --quiet manifest.sha256 )
# 2. split every wheel larger than $limit into parts <wheel>.partNN (plain byte split; joined with cat).
rm -rf "$cache/parts" .v33[0-9][0-9] .v33z && mkdir -p "$cache/parts"
while read -r f size _; do
  if [ "$size" -gt "$limit" ]; then split -b "$limit" -d -a 2 "$cache/$f" "$cache/parts/$f.part"
  else ln -f "$cache/$f" "$cache/parts/$f" 2>/dev/null || cp "$cache/$f" "$cache/parts/$f"; fi
done < "$manifest"
# 3. pack parts and small wheels into folders .v3300, .v3301, ... of at most $limit bytes (first fit decreasing).
python3 - "$cache/parts" "$limit" <<'PY'
import os, sys, shutil
src, limit = sys.argv[1], int(sys.argv[2])
items = sorted(((os.path.getsize(os.path.join(src, f)), f) for f in os.listdir(src)), key=lambda x: (-x[0], x[1]))
bins = []
for size, f in items:
    for b in bins:
        if b[0] + size <= limit:
            b[0] += size; b[1].append(f); break
    else:
        bins.append([size, [f]])
bins.sort(key=lambda b: min(b[1]))  # keep parts of one wheel in ascending folders where possible
for i, (size, files) in enumerate(bins):
    d = ".v33%02d" % i
    os.makedirs(d)
    for f in files:
        shutil.move(os.path.join(src, f), os.path.join(d, f))
print(len(bins), "folders")
PY
rmdir "$cache/parts"
# 4. the last folder: install.sh + manifest.sha256
mkdir -p .v33z
cp "$cache/manifest.sha256" .v33z/manifest.sha256
cat > .v33z/install.sh <<'INSTALL'
#!/usr/bin/env bash
# Runs ON the GPU machine, from the project root, after every .v33NN folder was copied into /root/w33.
# Joins the wheel parts, checks every wheel's sha256, installs all into /tmp/site33 in ONE pip call.
set -euo pipefail
z="$(cd "$(dirname "$0")" && pwd)"
cd /root/w33
shopt -s nullglob
for first in *.part00; do
  whl="${first%.part00}"
  cat "$whl".part[0-9][0-9] > "$whl.tmp" && mv "$whl.tmp" "$whl"
done
if ! sha256sum -c --quiet "$z/manifest.sha256"; then
  echo "sha256 mismatch or missing wheel: resend the .v33NN folders that hold it" >&2; exit 1
fi
rm -f ./*.part[0-9][0-9]
rm -rf /tmp/site33
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site33 $(awk '{print "/root/w33/"$2}' "$z/manifest.sha256")
cd /tmp
PYTHONPATH=/tmp/site33 python3 - <<'PY'
import torch, re
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available(), torch.__file__)
if torch.cuda.is_available():
    torch.ones(2, device="cuda") @ torch.ones(2, device="cuda")
    print("cudnn", torch.backends.cudnn.version(), "nccl", torch.cuda.nccl.version())
libs = sorted({l.split()[-1] for l in open("/proc/self/maps") if re.search(r"lib(cudnn|nccl|cublas|cusparseLt|cudart)\.so", l)})
print("\n".join(libs))
import triton, vllm
print("triton", triton.__version__, "vllm", vllm.__version__, vllm.__file__)
PY
echo "vLLM 0.33.0 installed in /tmp/site33: export PYTHONPATH=/tmp/site33"
INSTALL
chmod +x .v33z/install.sh
n=$(ls -d .v33[0-9][0-9] | wc -l)
for d in .v33[0-9][0-9]; do
  b=$(find "$d" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
  [ "$b" -le "$limit" ] || { echo "folder $d holds $b bytes, over $limit" >&2; exit 1; }
done
echo "$n wheel folders + .v33z = $((n + 1)) device calls; $(awk '{s+=$2} END {printf "%.0f", s}' "$manifest") bytes of wheels"
echo "calls 1..$n: carry [\".v33NN\"] (NN = 00 .. $(printf %02d $((n - 1)))), command: mkdir -p /root/w33 && cp .v33NN/* /root/w33/"
echo "call $((n + 1)): carry [\".v33z\"], command: bash .v33z/install.sh"
