"""Union vs product vs product with a floor (a set's log wealth may not fall below -ln 2 + its gains): median answers."""
import math

import numpy as np

MAX_BET = 0.9
class B:
    def __init__(s, p0, n, floor):
        s.null_total, s.n, s.seen, s.total, s.lw, s.floor = p0 * n, n, 0, 0.0, 0.0, floor
    def m(s):
        left = s.n - s.seen
        return min(1.0, max(1e-6, (s.null_total - s.total) / left)) if left > 0 else 1.0
    def stake(s):
        m = s.m()
        if m >= 1: return 0.0
        mu = (1.0 + s.total) / (1 + s.seen)
        lam = min(max((mu - m) / (m * (1 - m)), 0.0), MAX_BET / m)
        if s.floor:  # a disagreement may not take the log wealth below -ln 2
            room = 1 - math.exp(-(s.lw + math.log(2))) if s.lw > -math.log(2) else 0.0
            lam = min(lam, max(room, 0.0) / m)
        return lam
    def upd(s, x):
        m, lam = s.m(), s.stake()
        s.lw += math.log1p(lam * (x - m)); s.seen += 1; s.total += x
def run(q, p0=(0.672, 0.758), n=(400, 200), rule="union", alpha=0.01, seed=0, budget=400):
    rng = np.random.default_rng(seed)
    ans = [rng.permutation(np.r_[np.ones(int(round(q[k] * n[k]))), np.zeros(n[k] - int(round(q[k] * n[k])))]) for k in (0, 1)]
    bets = [B(p0[k], n[k], rule == "floor") for k in (0, 1)]
    taken = [0, 0]
    for t in range(1, budget + 1):
        open_ = [k for k in (0, 1) if taken[k] < n[k]]
        k = max(open_, key=lambda j: (bets[j].lw, -taken[j] / n[j], -j))
        bets[k].upd(ans[k][taken[k]]); taken[k] += 1
        if rule == "union":
            if max(b.lw for b in bets) >= math.log(2 / alpha): return t
        elif sum(b.lw for b in bets) >= math.log(1 / alpha): return t
    return budget + 1


def main() -> None:
    suspects = {"copy": (1.0, 0.35), "copy-98": (0.98, 0.35), "adv-ft": (0.93, 0.45), "prune-80": (0.75, 0.37),
                "student-65": (0.65, 0.93), "student-75": (0.75, 0.93), "student-56": (0.56, 0.87), "extract-62": (0.62, 0.88),
                "weak-student": (0.6, 0.85)}
    for name, q in suspects.items():
        row = []
        for rule in ("union", "product", "floor"):
            r = [run(q, rule=rule, seed=s) for s in range(200)]
            row.append(f"{rule} {np.median(r):5.1f} (p90 {np.percentile(r, 90):5.1f})")
        print(f"{name:13s}", " | ".join(row))


if __name__ == "__main__":
    main()
