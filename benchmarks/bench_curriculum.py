"""What a SAT curriculum (dnr.curriculum: eps ramp, P-SAT, H-SAT) costs per training step, against plain
adversarial training (AT) measured in the same run.

The models are the SAT study's own (docs/sat/study/eps0.1-none: small_cnn after 3 epochs of PGD-7 AT on the full
Fashion-MNIST, dense and DNR at 20x), so that P-SAT's early stopping sees the probabilities of a trained model
(an untrained one doubts every example at once and would stop its whole attack at the first iterate); the batch
is 128 training images of the embedded subset, the study's batch size. Each case is one
``dnr.engine.adversarial_step`` with the run's config (PGD-7, eps 0.1, alpha 0.025, hybrid loss beta 0.5, its SGD;
DNR with its mask hook), from the checkpoint's weights each time, the curriculum set to a fixed difficulty lambda
before every call:

- ``none``: plain AT (the baseline of every ratio);
- ``eps`` and ``p-sat`` at lambda 0.1, 0.5 and 0.9 of their ramp (radius lambda * eps; P-SAT stops an example
  once its true-class probability is below (1 - lambda) * 0.5, and a stopped example leaves the attack's later
  passes: ``attack_examples_computed`` is the fraction of the attack's example-passes P-SAT still computes);
- ``h-sat`` at lambda 0.5 on a step without a measurement, and on a step with one (the top Hessian eigenvalue
  of the adversarial loss, 10 power iterations of Hessian-vector products on the step's batch).

After its ramp every curriculum runs AT's code path (full radius, no stopping), so the cost of a whole run is AT's
plus the ramp's share of the per-step difference, plus H-SAT's measurements: ``measurement_in_at_steps`` is
(step with measurement - step without) / AT step, and ``overhead_every_100`` that divided by 100, the study's
measurement interval. The cases' timed runs are alternated (time_alternated) and the minimum of each kept (CPU).
"""

import os

import torch

import _common
from dnr import curriculum, engine
from dnr.data import fashion_mnist
from dnr.harness.builders import make_optimizer
from dnr.harness.run import load_trained_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(REPO, "docs", "sat", "study", "eps0.1-none", "runs")
CHECKPOINTS = {"dense-at": os.path.join(STUDY, "dense-at-s0", "model.pt"),
               "dnr 20x": os.path.join(STUDY, "dnr-irregular-d0.05-s0", "model.pt")}
LAMBDAS = (0.1, 0.5, 0.9)
TOTAL_STEPS, RAMP, EVERY = 1000, 0.5, 100


def load(path, device):
    """(model in train mode, its run config, optimizer) from a study checkpoint."""
    model, cfg, _ = load_trained_model(path, device=str(device))
    model.train()
    if cfg.method == "dnr":
        opt, _ = _common.dnr_optimizer(model, device, cfg)  # the optimizer's step hook holds the controller
    else:
        opt = make_optimizer(cfg, model, device)
    return model, cfg, opt


def at_difficulty(sched: curriculum.Curriculum, lam: float, *, measure: bool = False) -> curriculum.Curriculum:
    """Put ``sched`` where its next step has difficulty ``lam`` (and a Hessian measurement due or not)."""
    if isinstance(sched, curriculum.HessianSAT):
        sched.lam, sched.reference = lam, None
        sched.step = 0 if measure else 1  # a measurement is due at every multiple of `every`
    elif sched.name != "none":
        sched.step = max(0, round(lam * sched.ramp * sched.total_steps) - 1)  # ramp_value(step) == lam
    return sched


def cases_for(model, cfg, opt, x, y):
    """(name -> closure of one training step at a fixed difficulty, computed(name, lambda): the fraction of
    the attack's example-passes that a curriculum at that difficulty computes)."""
    attack = dict(eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps, beta=cfg.beta,
                  attack_bn_mode=cfg.attack_bn_mode)
    gen = torch.Generator().manual_seed(0)
    # every step starts from the checkpoint's weights: trained again and again on one batch, the model would
    # grow confident on it, and P-SAT's early stopping (and so its cost) would drift from case to case
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def make(name, lam=1.0, measure=False):
        sched = curriculum.create(name, total_steps=TOTAL_STEPS, ramp=RAMP, prob=cfg.curriculum_prob,
                                  every=EVERY if name == "h-sat" else 0, ratio=cfg.curriculum_ratio,
                                  power_iters=cfg.curriculum_iters, seed=0)

        def step():
            model.load_state_dict(start)
            at_difficulty(sched, lam, measure=measure)
            engine.adversarial_step(model, x, y, opt, generator=gen, curriculum=sched, **attack)
            assert sched.measurements if measure else not sched.measurements
            sched.measurements.clear()
        return step

    def computed(name, lam=1.0):
        """The fraction of the attack's example-passes computed (P-SAT's stopped examples leave the batch)."""
        sched = at_difficulty(curriculum.create(name, total_steps=TOTAL_STEPS, ramp=RAMP, prob=cfg.curriculum_prob),
                              lam)
        model.load_state_dict(start)
        sizes = []
        hook = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
        try:
            sched.adversarial_examples(model, x, y, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps,
                                       bn_mode=cfg.attack_bn_mode, generator=torch.Generator().manual_seed(0))
        finally:
            hook.remove()
            model.train()
        return sum(sizes) / (cfg.attack_steps * len(y))

    cases = {"none": make("none")}
    for name in ("eps", "p-sat"):
        cases.update({f"{name} lambda {lam}": make(name, lam) for lam in LAMBDAS})
    cases["h-sat lambda 0.5"] = make("h-sat", 0.5)
    cases["h-sat lambda 0.5 + measurement"] = make("h-sat", 0.5, measure=True)
    return cases, computed


def check(model, cfg, x, y):
    """The curriculum's examples stay in their ball: eps ramp at lambda 0.5 within 0.5 eps, P-SAT within eps."""
    for name, bound in (("eps", 0.5 * cfg.eps), ("p-sat", cfg.eps)):
        sched = at_difficulty(curriculum.create(name, total_steps=TOTAL_STEPS, ramp=RAMP), 0.5)
        assert abs(sched.difficulty() - 0.5) < 1e-9, (name, sched.difficulty())
        x_adv = sched.adversarial_examples(model, x, y, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.attack_steps)
        assert float((x_adv - x).abs().max()) <= bound + 1e-6, f"{name}: perturbation above {bound}"
    model.train()


def main():
    p = _common.parser(__doc__)
    p.add_argument("--batch", type=int, default=128, help="training batch (the study's: 128)")
    args = p.parse_args()
    device = _common.setup(args)
    data = fashion_mnist("train", subset=args.batch)
    x, y = data.tensors[0].to(device), data.tensors[1].to(device)
    rows = []
    for label, path in CHECKPOINTS.items():
        if not os.path.isfile(path):
            raise SystemExit(f"checkpoint {path!r} is missing: it is committed with the SAT study (docs/sat/study)")
        model, cfg, opt = load(path, device)
        check(model, cfg, x, y)
        cases, computed = cases_for(model, cfg, opt, x, y)
        times = _common.time_alternated(cases, device, args.repeats, warmup=1)
        at = times["none"]
        for case, ms in times.items():
            row = {"model": f"small_cnn {label}", "case": case, "step_ms": ms, "cost_vs_at": ms / at}
            if case.startswith("p-sat"):
                row["attack_examples_computed"] = computed("p-sat", float(case.split()[-1]))
            rows.append(row)
        measurement = times["h-sat lambda 0.5 + measurement"] - times["h-sat lambda 0.5"]
        rows.append({"model": f"small_cnn {label}", "case": "h-sat measurement (10 power iterations)",
                     "measurement_ms": measurement, "measurement_in_at_steps": measurement / at,
                     "cost_vs_at_overhead_every_100": measurement / at / EVERY})
    _common.write("curriculum", device, rows, args,
                  {"batch": args.batch, "checkpoints": {k: os.path.relpath(v, REPO) for k, v in CHECKPOINTS.items()},
                   "lambdas": list(LAMBDAS), "measurement_every": EVERY})


if __name__ == "__main__":
    main()
