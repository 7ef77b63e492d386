"""Several processes for one training — the GPUs of a machine, or of several machines — through accelerate.

`dreambooth train --num-processes N` (or `--accelerate-config FILE`) does not train in its own process: it checks
the input once, writes the checked settings to a file, and starts the training processes with accelerate's
launcher (torch's elastic launcher, torchrun, underneath). Each of them is one rank; dreambooth/train.py shares
out the work. A process that a launcher started — torchrun, `accelerate launch`, DeepSpeed's — trains in itself,
so `torchrun --nproc-per-node 4 -m dreambooth train ...` works as well.

Several machines: run the same command on each, with its own --machine-rank; all of them must see the same
--output (and the same data) on a shared filesystem: the first process writes, all of them read.
"""

import contextlib
import json
import logging
import os
import signal
import tempfile
from pathlib import Path

from dreambooth import events, runlock
from dreambooth.checkpoints import REPORT_FILE
from dreambooth.config import TrainConfig
from dreambooth.distributed import check_deepspeed
from dreambooth.errors import UserError
from dreambooth.preflight import check_output, preflight, resolve_model

# what torchrun, accelerate launch, DeepSpeed's launcher and mpirun set in the processes they start
_RANK_VARIABLES = ("LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launched() -> bool:
    """Whether this process is one rank of a run a launcher started (then it trains, it does not launch)."""
    return any(name in os.environ for name in _RANK_VARIABLES) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def train(cfg: TrainConfig, model=None, instance_images: dict | None = None) -> dict:
    """Train here, or start the processes the settings ask for and wait for them. Returns the run's report.
    `model`, `instance_images`: resolved and checked by the caller already (each launched process does it anew)."""
    from dreambooth import train as training

    if launched() and int(os.environ.get("RANK", "0")) != 0:
        return training.train(cfg)  # a foreign launcher's other ranks: rank 0 holds the output folder for all
    check_output(cfg.output)
    # one run per output folder; the processes our launcher starts inherit the lock (runlock's rule)
    with runlock.hold(cfg.output, runlock.this_command()):
        if launched() or not cfg.launches_processes:
            return training.train(cfg, model, instance_images)
        return launch(cfg)


def launch(cfg: TrainConfig) -> dict:

    # one error message, here, rather than one per process; warnings come later from the first process
    events.silence()
    try:
        preflight(cfg)
    finally:
        events.silence(False)
    if cfg.accelerate_config is not None and not cfg.accelerate_config.is_file():
        raise UserError(f"--accelerate-config {cfg.accelerate_config} does not exist", "make one: `accelerate config`")
    check_deepspeed(cfg)
    resolve_model(cfg)  # a single file is converted once, here, not by a process while the others wait

    with tempfile.TemporaryDirectory(prefix="dreambooth-launch-") as tmp:
        settings = Path(tmp) / "train.json"
        settings.write_text(json.dumps(cfg.to_dict()))
        code = run_launcher(launcher_args(cfg, settings))
    if code == 130:
        raise KeyboardInterrupt  # the first process said where it stopped and what it saved
    if code:
        # each process printed its own error; this one only passes on the exit status (2 input, 3 environment)
        raise SystemExit(code)
    report = cfg.output / REPORT_FILE
    return json.loads(report.read_text()) if report.is_file() else {"report": None}


def launcher_args(cfg: TrainConfig, settings: Path) -> list[str]:
    """`accelerate launch` arguments that start this run's processes, each running `dreambooth train-worker`."""
    args = []
    if cfg.accelerate_config is not None:
        args += ["--config_file", str(cfg.accelerate_config)]  # it says how; the flags given here still win
    elif cfg.deepspeed:
        # torchrun's launcher too (also for one process: DeepSpeed needs its rendezvous); the ZeRO settings the
        # processes use are the ones train.make_accelerator gives DeepSpeed, these only keep the launcher's agreeing
        args += ["--use_deepspeed", "--zero_stage", cfg.distributed[-1]]
        args += ["--offload_optimizer_device", cfg.offload_optimizer]
    else:
        args += ["--multi_gpu"]  # torchrun's launcher; on a machine without GPUs the processes talk over gloo
    if cfg.num_processes > 1 or cfg.accelerate_config is None:
        args += ["--num_processes", str(cfg.num_processes)]
    if cfg.num_machines > 1 or cfg.accelerate_config is None:
        args += ["--num_machines", str(cfg.num_machines), "--machine_rank", str(cfg.machine_rank)]
    if cfg.main_process_ip:
        args += ["--main_process_ip", cfg.main_process_ip]
    if cfg.main_process_port is not None:
        args += ["--main_process_port", str(cfg.main_process_port)]
    elif cfg.num_machines == 1:
        args += ["--main_process_port", "0"]  # any free port: two runs on one machine do not collide
    # the cores shared out, not each process using all of them (torchrun's default would be one each)
    per_machine = max(1, cfg.num_processes // cfg.num_machines)
    threads = max(1, (os.cpu_count() or 1) // per_machine)
    args += ["--num_cpu_threads_per_process", str(threads), "--mixed_precision", cfg.mixed_precision]
    args += ["--dynamo_backend", "no", "--module", "dreambooth"]
    if events._json_mode:
        args += ["--log-format", "json"]
    return [*args, "train-worker", str(settings)]


def run_launcher(args: list[str]) -> int:
    """Run accelerate's launcher in this process; the exit status of the first process that failed, or 0.

    Signals: torch's launcher starts each process in a session of its own, so docker stop and Ctrl-C reach this
    process alone. It passes them on, and keeps torch's own handler out: that one would kill the processes 30 s
    later, and saving a large checkpoint can take longer (the image's stop grace period is 2 minutes)."""
    import psutil
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    def pass_on(signum, frame):
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.NoSuchProcess):  # it ended meanwhile
                child.send_signal(signum)

    parsed = launch_command_parser().parse_args(args)
    previous = {s: signal.signal(s, pass_on) for s in (signal.SIGTERM, signal.SIGINT)}
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
    # the launchers' own log lines (defaults filled in, "failed (exitcode: 2)") would repeat what the processes said
    loggers = [logging.getLogger(name) for name in ("torch.distributed", "accelerate")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        launch_command(parsed)
        return 0
    except ValueError as exc:  # accelerate checks the combination of settings before it starts anything
        raise UserError(
            f"accelerate cannot launch these settings: {exc}", "check --num-processes, --distributed and the config"
        ) from None
    except ChildFailedError as exc:
        code = exc.get_first_failure()[1].exitcode
        return 128 - code if code < 0 else code  # killed by a signal: the shell's convention
    finally:
        os.environ.pop("TORCHELASTIC_SIGNALS_TO_HANDLE", None)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        for s, handler in previous.items():
            signal.signal(s, handler)


def read_settings(path: Path) -> TrainConfig:
    """The settings the launching process checked and wrote (TrainConfig.to_dict() as JSON)."""
    return TrainConfig.from_dict(json.loads(Path(path).read_text()))
