#!/usr/bin/env python3
# Not part of CI (about a minute per mutation). A hand-made mutation check: plants each error
# below in the source, runs the library's tests, prints which tests caught it, and restores
# the file. A mutation that no test catches is a gap in the tests.
#
#   bench/mutations.py            # every mutation
#   bench/mutations.py M1 M6      # some of them
import subprocess, sys, time, os
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = [
 ("M1 objective ignores lambda", "src/backdoor/objective.rs", "(backdoor * self.lambda)?", "(backdoor * 1.0)?"),
 ("M2 objective subtracts the backdoor term", "src/backdoor/objective.rs", "total: (task + (backdoor * self.lambda)?)?", "total: (task - (backdoor * self.lambda)?)?"),
 ("M3 poisoned share 1-abar instead of 1-sqrt(abar)", "src/family/diffusion/poison.rs", "let share = (alpha_bar.sqrt()?.neg()? + 1.0)?;", "let share = (alpha_bar.neg()? + 1.0)?;"),
 ("M4 DDPM coefficient without sqrt(1-abar)", "src/family/diffusion/poison.rs", "(1.0 - a.sqrt()) * (1.0 - ab).sqrt() / (1.0 - a)", "(1.0 - a.sqrt()) / (1.0 - a)"),
 ("M5 DDIM coefficient replaced by its small-step limit", "src/family/diffusion/poison.rs", "(a_s - a_t) / (a_s * sd_t - a_t * sd_s)", "{ let _ = (a_s, sd_s); sd_t }"),
 ("M6 rank p without the +1", "src/verify/mod.rs", "p_value: (1 + at_most) as f64 / (null.len() + 1) as f64,", "p_value: at_most.max(1) as f64 / (null.len() + 1) as f64,"),
 ("M7 combination drops its last series term", "src/verify/mod.rs", "for j in 1..ln_ps.len() {", "for j in 1..ln_ps.len() - 1 {"),
 ("M8 asr counts hits within twice the threshold", "src/metrics/mod.rs", "hits += (m < threshold) as usize;", "hits += (m < 2.0 * threshold) as usize;"),
]
which = sys.argv[1:] or [m[0][:2] for m in M]
for name, path, old, new in M:
    if name[:2] not in which: continue
    p = os.path.join(root, path)
    src = open(p).read()
    assert src.count(old) == 1, (name, src.count(old))
    open(p, "w").write(src.replace(old, new))
    try:
        t = time.time()
        r = subprocess.run(["cargo", "test", "--release", "--lib", "--no-fail-fast", "--", "--test-threads", "2"],
                           cwd=root, capture_output=True, text=True)
    finally:
        open(p, "w").write(src)  # restored even when interrupted
    out = r.stdout + r.stderr
    failed = [l.split()[1] for l in out.splitlines() if l.startswith("test ") and l.endswith("FAILED")]
    compile_err = "error[" in out or "could not compile" in out
    status = "COMPILE ERROR" if compile_err else ("caught" if failed else "MISSED")
    print(f"{name}: {status} by {len(failed)} test(s) {failed} ({time.time() - t:.0f} s)", flush=True)
