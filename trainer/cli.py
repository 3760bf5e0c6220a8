"""`coordinator`: run a swarmrl pool. `python -m trainer` is the same command."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import msgspec

from protocol import poolspec
from protocol.config import apply_overrides
from protocol.errors import SwarmError
from protocol.identity import Identity, describe, peer_id_of
from protocol.logs import logging_flags, setup_logging, tame_libp2p
from protocol.paths import swarmrl_home
from protocol.rlimit import raise_open_files_limit
from trainer import config as trainer_config
from trainer import launch

DEFAULT_KEY = swarmrl_home() / "coordinator.key"
OPERATOR_TOKEN_ENV = "SWARMRL_OPERATOR_TOKEN"
VALIDATOR_TOKEN_ENV = "SWARMRL_VALIDATOR_TOKEN"
INIT_EXAMPLES = """examples:
  coordinator init --model tiny -o pool.toml
  coordinator init --model Qwen/Qwen2.5-0.5B-Instruct --dataset openai/gsm8k \\
      --subset main --limit 1500 -o pool.toml
  coordinator init --model ./my-model --dataset ./data --prompt-column question \\
      --answer-column final --set algorithm.lr=2e-6 -o pool.toml
"""
VALIDATOR_EXAMPLES = """examples:
  coordinator run pool.toml --validator-listen 0.0.0.0:8700 --validator-token-file vt.txt
  coordinator validator http://COORDINATOR:8700 --token-file vt.txt --name gpu-box-1
"""
RUN_EXAMPLES = """examples:
  coordinator run pool.toml
  coordinator run pool.toml --max-steps 100 --set algorithm.lr=5e-6
  coordinator run pool.toml --announce /ip4/PUBLIC_IP/tcp/4001 --host 0.0.0.0 \\
      --operator-token-file token.txt --wandb my-project
"""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args)
    raise_open_files_limit()
    try:
        return args.run(args)
    except SwarmError as e:
        print(f"coordinator: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    flags = logging_flags("coordinator")
    parser = argparse.ArgumentParser(
        prog="coordinator",
        description="The coordinator of a swarmrl pool: leases work to nodes, validates every "
        "submission, trains on validated groups only, and publishes new weights.",
        parents=[flags],
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    init = sub.add_parser(
        "init",
        help="write a new pool spec (and the key, if missing)",
        description="Check a model and a task, choose settings for them, and write a pool "
        "file: the spec nodes must agree with (its hash is the pool id) and the coordinator's "
        "[algorithm] settings. Refuses, naming what is wrong, before writing anything.",
        epilog=INIT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[flags],
    )
    init.add_argument(
        "--model",
        default="tiny",
        help="a preset (tiny, smollm2-135m), a Hugging Face model folder, or a Hugging Face id "
        "(org/name[@revision], through the HF cache; offline it must be cached)",
    )
    init.add_argument(
        "--task",
        help="task: copy, sort, mod_add, arithmetic, gsm8k, dataset (default: the preset's; "
        "`dataset` with --dataset; else arithmetic)",
    )
    data = init.add_argument_group("data (the `dataset` task; all of it goes into the pool id)")
    data.add_argument(
        "--dataset", metavar="SOURCE", help="Hugging Face dataset id, folder, or JSONL/Parquet/CSV"
    )
    data.add_argument("--subset", help="the hub dataset's configuration, e.g. main")
    data.add_argument("--split", help="training split (default: train)")
    data.add_argument(
        "--eval-split",
        help="held-out split (default: test or validation if present; `none`: "
        "hold out 10%% of the training split)",
    )
    data.add_argument("--prompt-column", help="default: prompt, question or problem")
    data.add_argument("--answer-column", help="default: answer, solution or ground_truth")
    data.add_argument("--limit", type=int, help="train on the first N prompts only")
    data.add_argument(
        "--reward",
        action="append",
        default=[],
        metavar="NAME[*WEIGHT]",
        help="reward function (repeat; default: the task's own; with an answer column, exact "
        "numeric match or math-verify)",
    )
    data.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="any task option"
    )
    init.add_argument("--name", default="", help="a name for people (default: model-task)")
    init.add_argument(
        "--key", type=Path, default=DEFAULT_KEY, help="coordinator key (default: %(default)s)"
    )
    init.add_argument(
        "--listen",
        default="/ip4/127.0.0.1/tcp/4001",
        help="libp2p address `run` will listen on, written as the bootstrap peer",
    )
    init.add_argument(
        "--origin",
        default="http://127.0.0.1:8601",
        help="SHARDCAST origin URL `run` will serve (default: %(default)s)",
    )
    init.add_argument(
        "--relay", action="append", default=[], metavar="URL", help="relay URL (repeat)"
    )
    init.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any pool spec field, e.g. algorithm.lr=1e-4",
    )
    init.add_argument("-o", "--output", type=Path, required=True, help="pool spec file to write")
    init.set_defaults(run=_init)

    run = sub.add_parser(
        "run",
        help="run the pool described by a pool spec",
        description="Serve a pool: the libp2p host nodes join through, the SHARDCAST weights "
        "origin, validation of every submission, GRPO training on validated groups, and the "
        "API, metrics and dashboard. Restarting with the same pool file and --data-dir "
        "resumes from the last checkpoint.",
        epilog=RUN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[flags],
    )
    run.add_argument("spec", type=Path, help="pool spec TOML")
    run.add_argument(
        "--key", type=Path, default=DEFAULT_KEY, help="coordinator key (default: %(default)s)"
    )
    run.add_argument(
        "--data-dir",
        type=Path,
        help="ledger, checkpoints, weights, logs (default: $SWARMRL_HOME/pools/<pool id>)",
    )
    run.add_argument(
        "--listen",
        action="append",
        metavar="MULTIADDR",
        help="libp2p listen address (default: the spec's bootstrap address)",
    )
    run.add_argument(
        "--announce",
        action="append",
        metavar="MULTIADDR",
        help="public address to tell nodes, when it differs from --listen",
    )
    run.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: %(default)s)")
    run.add_argument(
        "--http-port", type=int, default=8600, help="API and dashboard port (default: %(default)s)"
    )
    run.add_argument(
        "--origin-port", type=int, help="SHARDCAST origin port (default: the spec's origin URL)"
    )
    token = run.add_mutually_exclusive_group()
    token.add_argument(
        "--operator-token-file",
        type=Path,
        help="file holding the token that allows state changes through the API (the "
        f"environment variable {OPERATOR_TOKEN_ENV} works too; both keep it out of `ps`)",
    )
    token.add_argument(
        "--operator-token", help="the token itself (visible to other local users: prefer a file)"
    )
    run.add_argument(
        "--wandb",
        metavar="PROJECT",
        help="also log to Weights & Biases (pip install 'swarmrl[wandb]'; WANDB_MODE=offline "
        "works without network)",
    )
    run.add_argument("--max-steps", type=int, help="stop training after this many steps")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting: algorithm.KEY=VALUE (the training settings) keeps the pool "
        "id; any other pool spec field changes it",
    )
    run.add_argument(
        "--config",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="TOML with [algorithm] settings over the pool file's (repeat: later files win)",
    )
    launch.add_flags(run)
    run.add_argument(
        "--validator-backend",
        choices=["hf", "vllm"],
        help="what validators prefill with (default: the config's [trainer] validator_backend)",
    )
    run.add_argument(
        "--validator-listen",
        metavar="HOST:PORT",
        help="serve validators on other machines here (they need the validator token)",
    )
    run.add_argument(
        "--validator-token-file",
        type=Path,
        help="file holding the token validators on other machines present (or "
        f"${VALIDATOR_TOKEN_ENV})",
    )
    run.set_defaults(run=_run)

    val = sub.add_parser(
        "validator",
        help="validate submissions for a coordinator, from another machine",
        description="Pull batches of submissions from a coordinator's validator port "
        "(`coordinator run --validator-listen`), validate them exactly as the coordinator "
        "does (the weights fetched over SHARDCAST and checked against the signed manifests), "
        "and send the verdicts back. The coordinator trusts them: give this command only to "
        "machines you control.",
        epilog=VALIDATOR_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[flags],
    )
    val.add_argument("url", help="the coordinator's validator port, e.g. http://10.0.0.1:8700")
    val.add_argument(
        "--token-file", type=Path, help=f"the validator token (or ${VALIDATOR_TOKEN_ENV})"
    )
    val.add_argument("--name", default="validator", help="shown in verdicts (default: %(default)s)")
    val.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="URL",
        help="SHARDCAST source for the weights (repeat; default: the spec's origin and relays)",
    )
    val.add_argument("--data-dir", type=Path, help="where fetched versions go")
    val.add_argument("--device", default="cpu", help="where versions load (default: %(default)s)")
    val.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="prefill backend")
    val.set_defaults(run=_validator)

    ev = sub.add_parser(
        "eval",
        help="greedy accuracy (and pass@k) of a model on a task's held-out split",
        description="Greedy accuracy on the held-out split; with --k above 1 also pass@1 and "
        "pass@k of k seeded samples per prompt (unbiased estimator). A multi-turn task (guess) "
        "plays whole episodes against its environment and adds mean_turns and rewarded. "
        "Prints JSON.",
        parents=[flags],
    )
    _model_task_flags(ev, split="test")
    ev.add_argument(
        "--k", type=int, default=1, help="samples per prompt for pass@k (default: 1, greedy only)"
    )
    ev.add_argument("--output", type=Path, help="also write the JSON here")
    ev.set_defaults(run=_eval)

    cur = sub.add_parser(
        "curate",
        help="keep the prompts a model solves sometimes, not always or never",
        description="Sample N completions of each prompt with the model (seeded) and write "
        "the prompts it solves sometimes but not always, each with its pass rate, as JSONL "
        "(a dataset for `coordinator init --dataset`). Prints a JSON summary.",
        parents=[flags],
    )
    _model_task_flags(cur, split="train")
    cur.add_argument("--n", type=int, default=8, help="samples per prompt (default: 8)")
    cur.add_argument("-o", "--output", type=Path, required=True, help="JSONL file to write")
    cur.set_defaults(run=_curate)

    keygen = sub.add_parser(
        "keygen", help="create the coordinator's ed25519 signing key", parents=[flags]
    )
    keygen.add_argument(
        "--out", type=Path, default=DEFAULT_KEY, help="key file (default: %(default)s)"
    )
    keygen.set_defaults(run=_keygen)

    pid = sub.add_parser("id", help="print the pool id of a pool spec", parents=[flags])
    pid.add_argument("spec", type=Path, help="pool spec TOML")
    pid.set_defaults(run=_pool_id)
    return parser


def _model_task_flags(p: argparse.ArgumentParser, split: str) -> None:
    """The model, the task and how to sample it: what `eval` and `curate` share."""
    p.add_argument("--model", required=True, help="preset, HF folder (e.g. a version) or HF id")
    p.add_argument("--task", required=True)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="task option")
    p.add_argument("--seed", type=int, default=0, help="task and sampling seed (the pool's)")
    p.add_argument("--split", default=split, choices=["test", "train"])
    p.add_argument("--limit", type=int, help="the first N prompts only")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0, help="for sampled completions")
    p.add_argument("--dtype", default="float32")


def _init(args: argparse.Namespace) -> int:
    from trainer.pool_init import InitRequest, check_task, plan

    request = InitRequest(
        model=args.model,
        task=args.task,
        dataset=args.dataset,
        dataset_options={
            "subset": args.subset,
            "split": args.split,
            "eval_split": args.eval_split,
            "prompt_column": args.prompt_column,
            "answer_column": args.answer_column,
        },
        limit=args.limit,
        rewards=args.reward,
        options=args.option,
    )
    tree, lines = plan(request)
    tree["name"] = args.name or f"{args.model}-{tree['task']['name']}"
    listen = args.listen.split("/p2p/")[0]
    # The key is made only once every check passed: a refused init leaves nothing behind.
    identity = Identity.load(args.key) if args.key.exists() else Identity.generate()
    tree["coordinator"] = {
        "public_key": identity.public_key.hex(),
        "bootstrap": [f"{listen}/p2p/{identity.peer_id()}"],
        "origin": args.origin,
        "relays": args.relay,
    }
    tree = apply_overrides(tree, args.set)
    spec = poolspec.from_dict(poolspec.hashed_part(tree))
    config = trainer_config.from_dict(trainer_config.unhashed_part(tree))
    tree["task"], task_lines = check_task(spec)
    spec = poolspec.from_dict(poolspec.hashed_part(tree))
    for line in lines + task_lines:
        print(line)
    pid = poolspec.pool_id(spec)
    header = (
        f"# swarmrl pool spec. Its pool id is {pid}: any change of a value above the\n"
        "# [algorithm] table changes it. Run it with: coordinator run "
        f"{args.output}\n\n"
    )
    trainer_part = (
        "\n# The coordinator's own training settings: not part of the pool id, so they can\n"
        "# change between runs of the same pool (`coordinator run --set algorithm.lr=...`).\n"
    )
    text = (
        header
        + poolspec.dumps(spec, comments=True)
        + trainer_part
        + poolspec.dumps(config, comments=True)
    )
    if not args.key.exists():
        identity.save(args.key)
        print(f"created the coordinator key {args.key} (keep it private)")
    args.output.write_text(text)
    print(f"wrote {args.output}")
    print(f"pool id: {pid}")
    return 0


def _run(args: argparse.Namespace) -> int:
    import trio

    from toploc.prefill_vllm import require_vllm
    from trainer.coordinator import Coordinator, RunOptions

    tame_libp2p(args)

    spec = poolspec.load(args.spec)
    spec_sets = [s for s in args.set if s.split(".", 1)[0] not in poolspec.UNHASHED_TABLES]
    if spec_sets:
        spec = poolspec.from_dict(apply_overrides(msgspec.to_builtins(spec), spec_sets))
        print("note: --set changed the pool spec, so the pool id changed too", file=sys.stderr)
    trainer_sets = [s for s in args.set if s not in spec_sets] + launch.flag_overrides(args)
    if args.validator_backend is not None:
        trainer_sets.append(f"trainer.validator_backend={args.validator_backend}")
    config = trainer_config.load(args.spec, args.config, trainer_sets)
    if config.trainer.validator_backend == "vllm":
        require_vllm()  # refused before any model loads
    pid = poolspec.pool_id(spec)
    identity = Identity.load(args.key)
    listen = (
        args.listen
        or [
            a.split("/p2p/")[0]
            for a in spec.coordinator.bootstrap
            if a.endswith(peer_id_of(identity.public_key))
        ]
        or ["/ip4/127.0.0.1/tcp/0"]
    )
    origin_port = args.origin_port
    if origin_port is None:
        origin_port = _port_of(spec.coordinator.origin)
    options = RunOptions(
        data_dir=args.data_dir or swarmrl_home() / "pools" / pid,
        listen=listen,
        announce=args.announce,
        http_host=args.host,
        http_port=args.http_port,
        origin_port=origin_port,
        operator_token=_operator_token(args),
        validator_listen=_host_port(args.validator_listen) if args.validator_listen else None,
        validator_token=_token(args.validator_token_file, None, VALIDATOR_TOKEN_ENV, "validator"),
        wandb_project=args.wandb,
        max_steps=args.max_steps,
    )
    learner = launch.start_trainer(spec, config, options.data_dir)
    if learner is None:
        return 0  # a trainer rank > 0: rank 0 ran the coordinator and has stopped
    coordinator = Coordinator(spec, identity, options, config, learner)

    async def main_task() -> None:
        async with trio.open_nursery() as nursery:
            ends = await nursery.start(coordinator.run)
            at = coordinator.training.progress()
            step, version = at.step, at.version
            print(f"pool {ends.pool_id} ({spec.name}): step {step}, version {version}")
            for a in ends.addrs:
                print(f"  libp2p:    {a}")
            api = ends.api_url
            print(f"  dashboard: {api}/   API: {api}/api/status   docs: {api}/docs")
            print(f"  weights:   {ends.origin_url}")
            if coordinator.validator_url is not None:
                print(f"  validators: {coordinator.validator_url}")
            print(
                f"nodes join with: node join --pool {ends.pool_id} --bootstrap {ends.addrs[0]}",
                flush=True,
            )
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    print(
                        f"\n{signal.Signals(signum).name}: stopping (the last checkpoint is step "
                        f"{coordinator.training.committed_step})",
                        flush=True,
                    )
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main_task)
    finally:
        launch.stop_trainer(learner)
        coordinator.close()
    return 0


def _operator_token(args: argparse.Namespace) -> str | None:
    """From --operator-token-file, --operator-token or $SWARMRL_OPERATOR_TOKEN, in that order."""
    return _token(args.operator_token_file, args.operator_token, OPERATOR_TOKEN_ENV, "operator")


def _token(file: Path | None, value: str | None, env: str, what: str) -> str | None:
    """A secret from its file, else the value given, else the environment variable."""
    if file is not None:
        try:
            token = file.read_text().strip()
        except OSError as e:
            raise SwarmError(f"cannot read the {what} token file: {e}") from None
        if not token:
            raise SwarmError(f"the {what} token file {file} is empty")
        return token
    return value or os.environ.get(env) or None


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise SwarmError(f"expected HOST:PORT (e.g. 0.0.0.0:8700), not {text!r}")
    return host, int(port)


def _validator(args: argparse.Namespace) -> int:
    import httpx
    import trio

    from trainer.validator_agent import AgentOptions, ValidatorAgent, fetch_spec

    tame_libp2p(args)
    token = _token(args.token_file, None, VALIDATOR_TOKEN_ENV, "validator")
    if token is None:
        raise SwarmError(f"give the validator token: --token-file or ${VALIDATOR_TOKEN_ENV}")
    url = args.url.rstrip("/")
    try:
        spec = trio.run(fetch_spec, url, token)
    except (httpx.HTTPError, PermissionError) as e:
        raise SwarmError(f"cannot read the pool spec from {url}: {e}") from None
    pid = poolspec.pool_id(spec)
    options = AgentOptions(
        url=url,
        token=token,
        data_dir=args.data_dir or swarmrl_home() / "validators" / pid,
        name=args.name,
        sources=tuple(args.source),
        device=args.device,
        backend=args.backend,
    )
    agent = ValidatorAgent(spec, options)
    print(f"validating for pool {pid} ({spec.name}) from {url} as {args.name}", flush=True)
    try:
        trio.run(agent.run)
    except KeyboardInterrupt:
        print(f"stopped after {agent.validated} submissions", flush=True)
    except PermissionError as e:
        raise SwarmError(str(e)) from None
    return 0


def _eval(args: argparse.Namespace) -> int:
    from toploc.models import load_model
    from toploc.sampling import SamplingParams
    from trainer.evaluate import evaluate
    from trainer.tasks import make_task

    if args.k < 1:
        raise SwarmError(f"--k must be at least 1, not {args.k}")
    if args.temperature <= 0 and args.k > 1:
        raise SwarmError("pass@k samples need a temperature above 0")
    options = apply_overrides({}, args.option)
    task = make_task(args.task, args.seed, options)
    model, tok = load_model(args.model, args.dtype)
    sampling = SamplingParams(temperature=args.temperature)
    result = {
        "model": args.model,
        **evaluate(
            model,
            tok,
            task,
            args.split,
            args.limit,
            args.max_new_tokens,
            k=args.k,
            sampling=sampling,
            seed=args.seed,
        ),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


def _curate(args: argparse.Namespace) -> int:
    from toploc.models import load_model
    from toploc.sampling import SamplingParams
    from trainer.curate import CurateError, check_samples, curate, write_jsonl
    from trainer.tasks import make_task

    try:
        check_samples(args.n)  # before the model loads: a refusal should be quick
    except CurateError as e:
        raise SwarmError(str(e)) from None
    if args.temperature <= 0:
        raise SwarmError("curating samples: the temperature must be above 0")
    if args.limit is not None and args.limit < 1:
        raise SwarmError(f"--limit must be at least 1, not {args.limit}")
    task = make_task(args.task, args.seed, apply_overrides({}, args.option))
    model, tok = load_model(args.model, args.dtype)
    try:
        curated = curate(
            model,
            tok,
            task,
            args.n,
            SamplingParams(temperature=args.temperature),
            args.max_new_tokens,
            args.split,
            args.limit,
            args.seed,
            progress=True,
        )
    except CurateError as e:
        raise SwarmError(str(e)) from None
    write_jsonl(curated.rows, args.output)
    print(json.dumps({"model": args.model, "n": args.n, **curated.summary()}, indent=2))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    identity = Identity.generate()
    identity.save(args.out)
    print(f"created the coordinator key (keep {args.out} private)")
    print(describe(identity, args.out))
    return 0


def _pool_id(args: argparse.Namespace) -> int:
    print(poolspec.pool_id(poolspec.load(args.spec)))
    return 0


def _port_of(url: str) -> int:
    from urllib.parse import urlparse

    if not url:
        return 0
    try:
        return urlparse(url).port or 0
    except ValueError:
        raise SwarmError(f"the spec's origin {url!r} is not a URL") from None
