# Recipes a researcher runs. `just --list` shows them all; extra arguments go to the command.

# the test suite: fast, CPU, offline
test *args:
    python -m pytest {{args}}

# grader self-check: the hack x mode diagonal over every built-in problem
check *args:
    python -m projected_grpo.rewards {{args}}

# the same, every problem graded in every mode (6x the work)
check-cross:
    python -m projected_grpo.rewards --cross

# bake the fixture teacher pool from the package's own completions
build-pool *args:
    python -m projected_grpo.teacher_pool --out out/pools/fixture {{args}}

# smoke run, erase arm (tiny-random on CPU, 30 steps)
smoke *args:
    rm -rf out/runs/smoke-erase-s0
    python -m projected_grpo.train smoke --intervention=erase {{args}}

# smoke run, vanilla GRPO (measure only)
smoke-vanilla *args:
    rm -rf out/runs/smoke-none-s0
    python -m projected_grpo.train smoke --intervention=none {{args}}

# smoke run, route arm, with basis refresh and deploy evaluation every 10 steps
smoke-route *args:
    rm -rf out/runs/smoke-route-s0
    python -m projected_grpo.train smoke --intervention=route --refresh_every=10 --eval_every=10 {{args}}

# two CPU processes on torch.distributed (Gloo), 3 smoke steps; then the test that compares them with one process
smoke-ddp *args:
    rm -rf out/runs/smoke-ddp
    python -m torch.distributed.run --standalone --nproc_per_node=2 -m projected_grpo.train smoke --steps=3 --run_name=smoke-ddp {{args}}
    python -m pytest -q tests/test_distributed.py

# the main job: every arm on the smoke preset, then the results table
smoke-all: smoke smoke-vanilla smoke-route results

# the basis cache at work: a miss (extract and save), then a hit (load)
smoke-both:
    rm -rf out/runs/smoke-both-miss out/runs/smoke-both-hit out/bases/smoke-both.safetensors
    python -m projected_grpo.train smoke --steps=3 --basis_path=out/bases/smoke-both.safetensors --run_name=smoke-both-miss
    python -m projected_grpo.train smoke --steps=3 --basis_path=out/bases/smoke-both.safetensors --run_name=smoke-both-hit

# build (or find cached) the CPU model organism: a 0.4M-parameter Qwen3 warm-started to hack now and then (~2.5 min alone)
organism-build *args:
    python -m projected_grpo.organism build {{args}}

# the organism study on 2 CPU cores: every arm over 3 seeds, then the tables and plots (about half an hour)
organism *args:
    python -m projected_grpo.sweep organism --arms none,erase,route,erase:random,erase:nonhack,screen --seeds 1,2,3 --jobs 2 {{args}}
    python -m projected_grpo.plots out/sweeps/organism
    python -m projected_grpo.results out/sweeps/organism

# the fair test's ladder on the organism (docs/hypotheses/fair-test.md; it ran at 59c1fff, whose smoothed gate forgot at
# every refresh: rungs a-c never refreshed and rebuild as they were, the live rungs d-f, superseded by the gate study, now
# run under the fixed gate), as run: seed 1 for every rung, seeds 2-3
# for the references and for each rung that reached the registered 10 points on seed 1 (each sweep skips what is done)
fair-test:
    #!/usr/bin/env bash
    set -euo pipefail
    S="python -m projected_grpo.sweep organism --jobs 2 --adam_leak=update"
    $S --seeds 1,2,3 --name fair-ref --arms none,screen
    $S --seeds 1,2,3 --name fair-d --arms erase,erase:random --pairs=live --refresh_every=5
    $S --seeds 1,2,3 --name fair-e --arms erase --pairs=live --refresh_every=5 --live_labels=oracle
    $S --seeds 1 --name fair-f --arms route,route:capacity --pairs=live --refresh_every=5
    $S --seeds 1 --name fair-a --arms erase,erase:random
    $S --seeds 1,2,3 --name fair-b --arms erase,erase:random --basis_k=32
    $S --seeds 1 --name fair-c --arms erase,erase:random --pairs=self --pair_contrast=failed
    just fair-test-tables

# each rung of the fair test read in out/fair-test/<rung>, links to its runs and to the references: the registered
# hypothesis's verdicts in out/fair-test/<rung>.md, the plots in out/fair-test/<rung>-plots
fair-test-tables:
    #!/usr/bin/env bash
    set -euo pipefail
    for rung in a b c d f; do
        dir=out/fair-test/$rung
        rm -rf $dir && mkdir -p $dir
        for run in out/sweeps/fair-$rung/organism-* out/sweeps/fair-ref/organism-*; do ln -s "$PWD/$run" $dir/; done
        if [ $rung = d ]; then for run in out/sweeps/fair-e/organism-*; do ln -s "$PWD/$run" $dir/; done; fi
        python -m projected_grpo.plots $dir --out $dir-plots
        python -m projected_grpo.results $dir --hypothesis docs/hypotheses/fair-test/$rung.json --plots $dir-plots \
            --out $dir.md
    done

# the gate study on the organism (docs/hypotheses/gate-study.md): every arm on seeds 1-3 with a live V, the gate a
# factor (erase under the smoothed gate and under no_gate, each with its random control and its ceiling), screen+erase,
# route judged deployed; then its tables in out/gate-study/<question>.md (each sweep skips what is done)
gate-study:
    #!/usr/bin/env bash
    set -euo pipefail
    S="python -m projected_grpo.sweep organism --jobs 2 --adam_leak=update --pairs=live --refresh_every=5 --eval_samples=32"
    $S --seeds 1,2,3 --name gate-study --arms none,screen,erase,erase:random,erase@no_gate,erase@no_gate:random,screen+erase@no_gate,screen+erase@no_gate:random,route,route:capacity
    $S --seeds 1,2,3 --name gate-study-ceiling --arms erase,erase@no_gate --live_labels=oracle
    # seeds 4 and 5 for both arms of every contrast whose interval straddled its bound at n = 3, as registered
    $S --seeds 4,5 --name gate-study-seeds45 --arms none,erase,erase@no_gate,route,route:capacity
    just gate-study-tables

# the monitor study on the organism (docs/hypotheses/monitor-study.md): screen, erase, screen+erase and the probe's
# screen and advmod at the detector's recall 1, 0.7 and 0.4, each projecting arm with its random control; then its
# tables in out/sweeps/monitor-study/<question>.md (the sweep skips what is done)
monitor-study:
    python -m projected_grpo.sweep organism --jobs 2 --adam_leak=update --pairs=live --refresh_every=5 --seeds 1,2,3 --name monitor-study --arms none,screen,erase,erase:random,screen+erase@no_gate,screen+erase@no_gate:random,screen~probe,advmod~probe,screen~r0.7~fp0.02,erase~r0.7~fp0.02,erase~r0.7~fp0.02:random,screen+erase@no_gate~r0.7~fp0.02,screen+erase@no_gate~r0.7~fp0.02:random,screen~probe~r0.7~fp0.02,advmod~probe~r0.7~fp0.02,screen~r0.4~fp0.02,erase~r0.4~fp0.02,erase~r0.4~fp0.02:random,screen+erase@no_gate~r0.4~fp0.02,screen+erase@no_gate~r0.4~fp0.02:random,screen~probe~r0.4~fp0.02,advmod~probe~r0.4~fp0.02
    just monitor-study-tables

# the monitor study's tables and plots (the hack rate against recall among them): one report per registered question
monitor-study-tables:
    python -m projected_grpo.plots out/sweeps/monitor-study --out out/sweeps/monitor-study/plots
    for question in mechanism leak beats-screen controls probe; do python -m projected_grpo.results out/sweeps/monitor-study --hypothesis docs/hypotheses/monitor-study/$question.json --out out/sweeps/monitor-study/$question.md --plots out/sweeps/monitor-study/plots; done

# the gate study's tables: out/gate-study links seeds 1-3 of every arm (each question's registered reading),
# out/gate-study-n5 adds seeds 4-5 (the registered reading of the contrasts that straddled their bound at n = 3); one
# report per registered question in each; plots of each question's arms beside vanilla and screen in
# out/gate-study-plots/<view>
gate-study-tables:
    #!/usr/bin/env bash
    set -euo pipefail
    rm -rf out/gate-study out/gate-study-n5 out/gate-study-views out/gate-study-plots
    mkdir -p out/gate-study out/gate-study-n5
    for run in out/sweeps/gate-study/organism-* out/sweeps/gate-study-ceiling/organism-*; do ln -s "$PWD/$run" out/gate-study/; done
    for run in out/sweeps/gate-study*/organism-*; do ln -s "$PWD/$run" out/gate-study-n5/; done
    for reading in gate-study gate-study-n5; do
        for question in mechanism smoothed no_gate against-screen route; do
            python -m projected_grpo.results out/$reading --hypothesis docs/hypotheses/gate-study/$question.json \
                --out out/$reading/$question.md
        done
    done
    declare -A views=([smoothed]="erase-s erase-random-s erase-ceiling-s" [no_gate]="erase@no_gate-s erase@no_gate-random-s erase@no_gate-ceiling-s" [screen]="screen+erase@no_gate-s screen+erase@no_gate-random-s" [route]="route-s route-capacity-s")
    for view in "${!views[@]}"; do
        mkdir -p out/gate-study-views/$view
        for arm in none-s screen-s ${views[$view]}; do
            for run in out/gate-study/organism-$arm[0-9]*; do ln -s "$(readlink -f $run)" out/gate-study-views/$view/; done
        done
        python -m projected_grpo.plots out/gate-study-views/$view --out out/gate-study-plots/$view
    done

# one GPU: Qwen3 in bf16, erase arm
fast *args:
    python -m projected_grpo.train fast --intervention=erase {{args}}

# one GPU: vanilla GRPO
fast-vanilla *args:
    python -m projected_grpo.train fast --intervention=none {{args}}

# the long run
full *args:
    python -m projected_grpo.train full {{args}}

# tables from every run under out/runs (also written to out/results.md)
results *args:
    python -m projected_grpo.results {{args}}

# held-out evaluation of a run's checkpoint (hint and neutral prompts, per mode; writes RUN_DIR/eval.json)
evaluate *args:
    python -m projected_grpo.evaluate {{args}}

# a run's model as a plain transformers checkpoint: just export out/runs/NAME --out DIR [--checkpoint STEP] [--keep_quarantine]
export *args:
    python -m projected_grpo.export {{args}}

# a grid of runs in out/sweeps/<name>: just sweep smoke --arms none,erase,erase:random --seeds 1,2,3 --jobs 2
sweep *args:
    python -m projected_grpo.sweep {{args}}

# the leave-one-mode-out study in out/sweeps/<preset>-lomo: just lomo --preset smoke --seeds 1
lomo *args:
    python -m projected_grpo.sweep --lomo --arms none,erase,route,erase:random,screen,trusted {{args}}

# PNG plots per question under out/plots, which `results` then links (needs pip install -e '.[plot]')
plots *args:
    python -m projected_grpo.plots {{args}}

# the organism's step through TRL's GRPOTrainer (LoRA) and projected_grpo, taking turns (under "peer" in out/bench.json);
# needs the peer extra: pip install -e '.[peer]'
bench-peer *args:
    python -m projected_grpo.bench_peer {{args}}

# speed and memory figures as ratios (out/bench.json); --large-vocab, --device cuda
bench *args:
    python -m projected_grpo.bench {{args}}

# the organism step taking turns with an older commit's code, seeds 1-3 (under "vs <arm>" in out/bench.json);
# 4851086 is the baseline of the speed-up in docs/performance.md; --seeds, --steps, --arm (the training flags, e.g.
# --arm='--intervention=erase --pairs=live --refresh_every=5 --adam_leak=update', which the commit must know)
bench-vs commit *args:
    python -m projected_grpo.bench --vs {{commit}} {{args}}

# the device check on a lent GPU (docs/performance.md): the organism 20 steps vanilla and live-V erase on CUDA, the fast
# preset's dry run on tiny-random in bf16, `bench --device cuda`; one JSON in out/device-check.json, exit 1 naming any
# part that crashed; --device cpu is the fallback CI runs (smaller: --steps 4 --max_new 32 --bench_repeats 1)
gpu-check *args:
    python -m projected_grpo.device_check {{args}}

# style and obvious bugs
lint:
    ruff check src tests
