r"""Compile a run for a TPU topology on a CPU host: does it fit, how many FLOPs, which collectives.

    python -m repeat_scaling.compile --config=configs/xue2023.py:paper --topology=v4-128 \
        [--num_slices=2] [--eval_topology=v4-8|none] [--config.model.name=t5_xl ...]

No TPU is needed: with libtpu installed (the `dev` extra, or `pip install 'jax[tpu]'`),
``jax.experimental.topologies.get_topology_desc`` gives the abstract devices of a TPU
slice, and ``jit(...).lower(abstract inputs).compile()`` on a mesh of them runs the real
TPU compiler. What is compiled is the trainer's own program: the abstract train state
(``train.state.abstract_state``), the train step (``train.step.make_train_step``, with
the run's grad accumulation, steps per call, dropout, z-loss, interventions), on the
mesh the trainer builds (``mesh.ici`` within a slice, ``mesh.dcn`` across slices; with
``--num_slices`` > 1 and no ``mesh.dcn`` in the config, the slices are data parallel),
fed with the shapes of the run's objective. The evaluator's two programs (per-token loss
and attention weights of ``eval.runner.ModelRunner``, at ``eval.batch_size`` rows) are
compiled for ``--eval_topology`` (default: the tpu backend's evaluator VM type,
``v5litepod-1``, or one H100 for GPU targets; ``none`` skips them).

Output: a human table, then ONE JSON line (``{"compile_check": ...}``) with

* ``devices``, ``mesh``: the topology and the run's mesh axes;
* ``hbm``: per-chip bytes of arguments (state + batch), temporaries, outputs not
  aliased to (donated) arguments, generated code and their ``total``, against the chip's
  usable HBM (what the TPU compiler itself allows: 15.75 GiB of v5e's 16), ``fits`` and
  ``headroom``. A program over the limit does not compile: the compiler's
  RESOURCE_EXHAUSTED numbers are reported instead (``fits: false``);
* ``flops``: compiled FLOPs per train step with loop trip counts applied (XLA's
  ``cost_analysis`` counts a ``while`` body once, so a scanned layer stack shows up as
  one layer: each loop body is costed separately and multiplied by its trip count), for
  all chips together, beside the model FLOPs of ``models.sizes.flops_per_token`` (3 x
  forward, causal attention halved: remat, full attention masks and MoE capacity show up
  as ratio > 1);
* ``step_time_s``: the compiler's ``optimal_seconds`` when it is positive (else null),
  and the FLOP-bound lower bound compiled FLOPs / (chips x peak bf16 FLOP/s);
* ``collectives``: collective ops by kind, as written in the HLO and as executed per step
  (trip counts applied);
* ``compile_s``: wall time of lowering + compiling.

GPU targets (``--topology=h100x8``, ``h100x16``, ``h100x32``, ``h100x64``: 8 H100 80GB per
host) compile the same way with the CUDA PJRT plugin (``pip install -e '.[compile-gpu]'``,
no GPU or CUDA libraries needed), against ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (default
0.75, what jax preallocates) of each GPU's memory.

Errors (unknown topology, no libtpu, a config that does not validate) are one line on
stderr and exit status 1; a program that does not fit exits 2.

Modules: ``topologies`` (the accelerator types and their chips), ``devices`` (abstract
devices from libtpu or the CUDA plugin), ``programs`` (the trainer's and evaluator's
programs on them, compiled), ``analysis`` (memory, FLOPs with trip counts, collectives
read from a compiled program), ``check`` (one run's report; many runs, cached),
``report`` (the tables and the JSON line), ``cli`` (``python -m repeat_scaling.compile``).
"""


class CompileCheckError(ValueError):
    """A check that cannot run (unknown topology, no libtpu, bad config): one line."""
