"""Apply one-line defects to a copy of the repository, one at a time, and run the tests on each: every defect
must make at least one test fail. python tools/mutants.py [name fragments]; TESTS and MARK pick the tests
(default: the fast subset of the learner tests). About 5 minutes on one core."""
import os, shutil, subprocess, sys, tempfile
SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTANTS = [
    ("shacpp window-return sign", "shacpp.py", "    loss = -window_return + args.alpha * penalty", "    loss = window_return + args.alpha * penalty"),
    ("shac window-return sign", "shac.py", "    loss = -window_return + args.alpha * penalty", "    loss = window_return + args.alpha * penalty"),
    ("shacpp penalty sign", "shacpp.py", "    loss = -window_return + args.alpha * penalty", "    loss = -window_return - args.alpha * penalty"),
    ("shacpp discount dropped", "shacpp.py", "    ret = (discount[:, None, None] * rewards * alive[..., None]).sum(0)", "    ret = (rewards * alive[..., None]).sum(0)"),
    ("shacpp alive mask dropped", "shacpp.py", "    ret = (discount[:, None, None] * rewards * alive[..., None]).sum(0)", "    ret = (discount[:, None, None] * rewards).sum(0)"),
    ("shac discount dropped", "shac.py", "    ret = (discount[:, None, None] * rewards * alive[..., None]).sum(0)", "    ret = (rewards * alive[..., None]).sum(0)"),
    ("shac alive mask dropped", "shac.py", "    ret = (discount[:, None, None] * rewards * alive[..., None]).sum(0)", "    ret = (discount[:, None, None] * rewards).sum(0)"),
    ("imagine bypasses the world model", "shacpp.py", "    if world_model is not None:\n        obs = torch.cat(", "    if False:\n        obs = torch.cat("),
    ("lambda dropped", "shacpp.py", "((1 - lam) * next_values[t] + lam * g)", "(g)"),
    ("binned cache with one bin", "shacpp.py", "        self.bins, self.per_bin, self.device = bins, capacity // bins, device", "        self.bins, self.per_bin, self.device = 1, capacity, device"),
    ("binned cache range of the latest add only", "shacpp.py", "        self.low, self.high = torch.minimum(self.low, key.min()), torch.maximum(self.high, key.max())", "        self.low, self.high = key.min(), key.max()"),
    ("binned cache batches from a ninth of the stored items", "shacpp.py", "stored[torch.randint(len(stored), (batch_size,)", "stored[torch.randint(max(1, len(stored) // 9), (batch_size,)"),
    ("shacpp gradient clip dropped", "shacpp.py", "clip_grad_norm_(policy.parameters(), args.max_grad_norm)", "clip_grad_norm_(policy.parameters(), 1e9)"),
    ("policy dropout left on in an evaluation", "shacpp.py", "--capture-video)\n        metrics, frames = evaluate(policy.eval(),", "--capture-video)\n        metrics, frames = evaluate(policy,"),
    ("ppo advantage sign", "ppo.py", "torch.max(-adv * ratio, -adv * ratio.clamp(", "torch.max(adv * ratio, adv * ratio.clamp("),
]
only = sys.argv[1:]
tests = os.environ.get("TESTS", "tests/test_gradients.py tests/test_shacpp.py tests/test_learning.py tests/test_ppo.py").split()
for name, path, old, new in MUTANTS:
    if only and not any(o in name for o in only):
        continue
    dst = os.path.join(tempfile.mkdtemp(), "mutant")
    shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns("runs", ".venv", ".git", "results", "ablations", "docs", "*.log", "__pycache__"))
    text = open(os.path.join(dst, path)).read()
    assert text.count(old) == 1, (name, text.count(old))
    open(os.path.join(dst, path), "w").write(text.replace(old, new))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", os.environ.get("MARK", "not slow"), *tests],
                       cwd=dst, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    failed = [l.split(" ")[1] for l in r.stdout.splitlines() if l.startswith(("FAILED", "ERROR"))]
    print(f"{name}: {len(failed)} failed: {failed}", flush=True)
    shutil.rmtree(os.path.dirname(dst), ignore_errors=True)
