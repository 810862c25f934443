"""Start, drive and stop real Flower processes for the end-to-end tests.

Every process these helpers start gets the environment from :func:`flwr_env`,
which carries a unique tag (``FLWR_NOISE_E2E_TAG``). Flower detaches some of
its helper processes into sessions of their own (the managed local SuperLink
that ``flwr run .`` starts, the SuperExec of a SuperLink), so killing a process
group is not enough: :func:`stop_tagged_processes` finds every process whose
environment carries the tag (children inherit it) by reading ``/proc`` and
stops them all. This is Linux-only, like the CI machines.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import tomli
import tomli_w

PROCESS_TAG_VARIABLE = "FLWR_NOISE_E2E_TAG"
LOOPBACK = "127.0.0.1"
FINISHED_COMPLETED = "finished:completed"

_RUN_ID_PATTERN = re.compile(r"Successfully started run (\d+)")
_LOG_TAIL_CHARS = 6000


def free_port() -> int:
    """Return a TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def flwr_env(tmp_path: Path) -> dict[str, str]:
    """Return an environment that keeps Flower inside ``tmp_path``.

    Parameters
    ----------
    tmp_path : Path
        A folder owned by the test.

    Returns
    -------
    dict[str, str]
        The current environment plus: ``FLWR_HOME`` in ``tmp_path``; runtime
        dependency installation off (the App runs in this virtual environment);
        this interpreter's ``bin`` folder first on ``PATH`` (Flower starts its
        helpers by command name); telemetry and update checks off (no network);
        free loopback ports for the managed local SuperLink, so that two test
        runs at once do not collide; and a unique process tag.
    """
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env.update(
        {
            "FLWR_HOME": str(tmp_path / "flwr-home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
            "PYTHONUNBUFFERED": "1",
            PROCESS_TAG_VARIABLE: uuid.uuid4().hex,
        }
    )
    return env


def format_config_overrides(overrides: Mapping[str, bool | int | float | str]) -> str:
    """Format overrides as one ``--run-config`` / ``--node-config`` string.

    Flower splits the string on spaces into ``key=value`` pairs and reads each
    value as TOML, so strings must be quoted: ``results-dir='/tmp/x'``.
    """
    pairs = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif "'" in value:
            raise ValueError(
                f"config value {key}={value!r} is not allowed: expected a string "
                "without single quotes"
            )
        else:
            # A TOML literal string ('...') keeps backslashes and spaces as they are.
            text = f"'{value}'"
        pairs.append(f"{key}={text}")
    return " ".join(pairs)


def _read_log_tail(path: Path, chars: int = _LOG_TAIL_CHARS) -> str:
    if not path.exists():
        return f"[{path} does not exist]"
    return path.read_text(errors="replace")[-chars:]


@dataclass(frozen=True)
class StartedProcess:
    """A process started in its own process group, logging to ``log_path``."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def is_running(self) -> bool:
        """Return whether the process has not exited yet."""
        return self.popen.poll() is None

    def log_tail(self) -> str:
        """Return the end of the process's log, for failure messages."""
        return f"--- {self.name} ({self.log_path}) ---\n{_read_log_tail(self.log_path)}"


def stop_process_group(popen: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Stop the process group led by ``popen``: SIGTERM, wait, then SIGKILL.

    The group is signalled even when its leader has exited already, because
    helpers it started may still be running in the group.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(popen.pid, sig)
        except ProcessLookupError:
            break
        try:
            popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
    popen.wait()


@contextmanager
def started_process(
    name: str, command: Sequence[str], env: Mapping[str, str], log_dir: Path
) -> Iterator[StartedProcess]:
    """Start ``command`` in its own process group; always stop the group on exit.

    Parameters
    ----------
    name : str
        Short name, also the log file's stem (``<log_dir>/<name>.log``).
    command : Sequence[str]
        The command and its arguments.
    env : Mapping[str, str]
        Its environment, normally from :func:`flwr_env`.
    log_dir : Path
        Folder for the log file (stdout and stderr together).

    Yields
    ------
    StartedProcess
        The running process.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log_file:
        popen = subprocess.Popen(
            list(command),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield StartedProcess(name=name, popen=popen, log_path=log_path)
    finally:
        stop_process_group(popen)


def wait_for_port(
    port: int,
    *,
    host: str = LOOPBACK,
    timeout_s: float = 60.0,
    process: StartedProcess | None = None,
) -> None:
    """Wait until something accepts TCP connections on ``host:port``.

    Raises
    ------
    RuntimeError
        If ``process`` exits first (its log tail is in the message).
    TimeoutError
        If nothing listens within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and not process.is_running():
            raise RuntimeError(
                f"{process.name} exited with code {process.popen.returncode} "
                f"before listening on {host}:{port}\n{process.log_tail()}"
            )
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    details = process.log_tail() if process is not None else ""
    raise TimeoutError(
        f"nothing listens on {host}:{port} after {timeout_s}s\n{details}"
    )


@dataclass(frozen=True)
class CommandResult:
    """What a command printed (stdout and stderr together) and how it exited."""

    returncode: int
    output: str

    @property
    def run_id(self) -> int:
        """The id of the run that ``flwr run`` started."""
        match = _RUN_ID_PATTERN.search(self.output)
        if match is None:
            raise AssertionError(f"`flwr run` started no run:\n{self.output}")
        return int(match.group(1))


def run_command(
    command: Sequence[str], env: Mapping[str, str], cwd: Path, timeout_s: float
) -> CommandResult:
    """Run ``command`` to completion in its own process group.

    Raises
    ------
    TimeoutError
        If it runs longer than ``timeout_s``; its process group is killed first.
    """
    popen = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = popen.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_process_group(popen, grace_s=2.0)
        output, _ = popen.communicate()
        tail = output.decode(errors="replace")[-_LOG_TAIL_CHARS:]
        raise TimeoutError(
            f"`{' '.join(command)}` ran past {timeout_s}s; its output:\n{tail}"
        ) from None
    return CommandResult(popen.returncode, output.decode(errors="replace"))


def run_flwr(
    app_dir: Path,
    args: Sequence[str],
    env: Mapping[str, str],
    timeout_s: float = 300.0,
) -> CommandResult:
    """Run ``flwr run <app_dir> <args>`` from ``app_dir``.

    Without a connection name in ``args`` this uses the default local
    connection, which starts a managed local SuperLink in the background
    (stop it with :func:`stop_local_superlink`).
    """
    return run_command(["flwr", "run", str(app_dir), *args], env, app_dir, timeout_s)


def run_details(
    env: Mapping[str, str],
    run_id: int,
    connection: str | None = None,
    *,
    timeout_s: float = 30.0,
) -> dict[str, object]:
    """Return ``flwr ls --run-id`` details once the run has finished.

    Its ``status`` is ``finished:completed``, ``finished:failed`` or
    ``finished:stopped``; ``status-details`` holds the reason of a failure.
    """
    args = ["ls", *([connection] if connection else []), "--run-id", str(run_id)]
    args += ["--format", "json"]
    deadline = time.monotonic() + timeout_s
    while True:
        result = run_command(["flwr", *args], env, Path.cwd(), timeout_s)
        listing = json.loads(result.output)
        if not listing.get("success"):
            raise AssertionError(f"`flwr {' '.join(args)}` failed:\n{result.output}")
        (details,) = listing["runs"]
        if str(details["status"]).startswith("finished") or (
            time.monotonic() > deadline
        ):
            return details
        time.sleep(0.5)


def wait_for_supernodes(
    env: Mapping[str, str], connection: str, count: int, timeout_s: float = 60.0
) -> None:
    """Wait until ``count`` SuperNodes are online at the SuperLink of ``connection``.

    A SuperNode listening on its own port may not have registered with the
    SuperLink yet; a run started before that would find fewer clients.
    """
    args = ["supernode", "ls", connection, "--format", "json"]
    deadline = time.monotonic() + timeout_s
    while True:
        result = run_command(["flwr", *args], env, Path.cwd(), timeout_s)
        nodes = json.loads(result.output).get("nodes", [])
        online = [node for node in nodes if node.get("status") == "online"]
        if len(online) >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(online)} of {count} SuperNodes online after {timeout_s}s:\n"
                f"{result.output}"
            )
        time.sleep(0.5)


def _environ_of(pid: str) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # exited, a zombie, or not ours to read
        return []


def tagged_processes(env: Mapping[str, str]) -> list[int]:
    """Return the live processes whose environment carries ``env``'s tag."""
    tag = f"{PROCESS_TAG_VARIABLE}={env[PROCESS_TAG_VARIABLE]}".encode()
    return sorted(
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit()
        and int(entry.name) != os.getpid()
        and tag in _environ_of(entry.name)
    )


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_until_gone(env: Mapping[str, str], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := tagged_processes(env)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def stop_tagged_processes(env: Mapping[str, str], grace_s: float = 5.0) -> list[int]:
    """Stop every process started with ``env`` or by one of those processes.

    SIGTERM first (SuperLinks stop their helpers), SIGKILL to what is left
    after ``grace_s``.

    Returns
    -------
    list[int]
        The processes still alive afterwards (empty unless something is wrong).
    """
    _signal_all(tagged_processes(env), signal.SIGTERM)
    remaining = _wait_until_gone(env, grace_s)
    _signal_all(remaining, signal.SIGKILL)
    return _wait_until_gone(env, grace_s)


def stop_local_superlink(env: Mapping[str, str]) -> list[int]:
    """Stop the managed local SuperLink that ``flwr run`` started with ``env``.

    Flower 1.39 has no command for this. The SuperLink
    (``flower-superlink --simulation``, Runtime/Control HTTP API on
    ``$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``) runs detached in a session of its
    own, with its SuperExec in another one, and outlives ``flwr run``; they
    and the simulation processes inherited ``env``'s tag, so they are found
    by it. Like :func:`stop_tagged_processes`, this stops every process
    started with ``env``.

    Returns
    -------
    list[int]
        The processes still alive afterwards (empty unless something is wrong).
    """
    return stop_tagged_processes(env)


def write_superlink_connection(
    env: Mapping[str, str],
    name: str,
    control_address: str,
    root_certificates: Path | None = None,
) -> Path:
    """Write a ``[superlink.<name>]`` connection; return the file.

    The connection is insecure unless ``root_certificates`` (the CA
    certificate that signed the SuperLink's TLS certificate) is given; then
    ``flwr`` talks HTTPS and verifies the SuperLink with it. The Flower
    configuration file is ``$FLWR_HOME/config.toml``.
    """
    config_path = Path(env["FLWR_HOME"]) / "config.toml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    connection: dict[str, str | bool] = {"address": control_address}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(root_certificates)
    config = {"superlink": {"default": name, name: connection}}
    config_path.write_text(tomli_w.dumps(config))
    return config_path


@dataclass(frozen=True)
class Deployment:
    """A running SuperLink and its SuperNodes on the loopback interface."""

    connection_name: str
    env: dict[str, str]
    control_address: str
    fleet_address: str
    processes: tuple[StartedProcess, ...]

    def log_tails(self) -> str:
        """Return the end of every component's log, for failure messages."""
        return "\n".join(process.log_tail() for process in self.processes)


def component_env(env: Mapping[str, str], tmp_path: Path, name: str) -> dict[str, str]:
    """Return ``env`` with a Flower home of the component's own in ``tmp_path``.

    As on separate machines: two SuperNodes never install the same App into
    the same folder.
    """
    return {**env, "FLWR_HOME": str(tmp_path / "components" / name)}


@dataclass(frozen=True)
class ComponentCommands:
    """How to start the components of a deployment on given addresses.

    Attributes
    ----------
    superlink : Callable[[str, int], list[str]]
        (Fleet API address, Control API port on loopback) -> command.
    supernode : Callable[[str, int, int], list[str]]
        (Fleet API address, its Runtime API port on loopback, its index) ->
        command.
    root_certificates : Path | None
        The CA certificate of a SuperLink that serves TLS, for the ``flwr``
        connection to its Control API; None for an insecure SuperLink.
    """

    superlink: Callable[[str, int], list[str]]
    supernode: Callable[[str, int, int], list[str]]
    root_certificates: Path | None = None


def flower_commands(node_configs: Sequence[str]) -> ComponentCommands:
    """Plain ``flower-superlink`` / ``flower-supernode`` commands, insecure.

    SuperNode ``index`` gets ``--node-config node_configs[index]``.
    """
    return ComponentCommands(
        superlink=lambda fleet_address, control_port: [
            "flower-superlink",
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--fleet-api-address",
            fleet_address,
            "--host",
            LOOPBACK,
            "--port",
            str(control_port),
        ],
        supernode=lambda fleet_address, runtime_port, index: [
            "flower-supernode",
            "--insecure",
            "--superlink",
            fleet_address,
            "--host",
            LOOPBACK,
            "--port",
            str(runtime_port),
            "--node-config",
            node_configs[index],
        ],
    )


def partition_node_configs(num_supernodes: int) -> list[str]:
    """``partition-id=K num-partitions=N`` for each of ``num_supernodes``."""
    return [
        format_config_overrides({"partition-id": k, "num-partitions": num_supernodes})
        for k in range(num_supernodes)
    ]


@contextmanager
def deployment(
    tmp_path: Path,
    num_supernodes: int = 2,
    node_configs: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    connection_name: str = "e2e",
    commands: ComponentCommands | None = None,
    before_supernodes: Callable[[Deployment], None] | None = None,
) -> Iterator[Deployment]:
    """Run a SuperLink and ``num_supernodes`` SuperNodes on free loopback ports.

    Parameters
    ----------
    tmp_path : Path
        Folder for logs (``logs/``) and the components' Flower homes.
    num_supernodes : int
        How many SuperNodes to start.
    node_configs : Sequence[str] | None
        One ``--node-config`` string per SuperNode; by default
        :func:`partition_node_configs`. Only used without ``commands``.
    env : Mapping[str, str] | None
        Environment from :func:`flwr_env`; a new one when None.
    connection_name : str
        Name of the ``[superlink.<name>]`` connection written for ``flwr run``.
    commands : ComponentCommands | None
        How to start the components; by default :func:`flower_commands`.
    before_supernodes : Callable[[Deployment], None] | None
        Called with the deployment so far (the SuperLink only, its connection
        written) before any SuperNode starts, e.g. to register SuperNode keys.

    Yields
    ------
    Deployment
        The running deployment, once every SuperNode is online. Every process
        is stopped on exit, also when the body raises.
    """
    env = dict(env) if env is not None else flwr_env(tmp_path)
    if commands is None:
        node_configs = node_configs or partition_node_configs(num_supernodes)
        if len(node_configs) != num_supernodes:
            raise ValueError(
                f"node_configs has {len(node_configs)} entries; expected one for "
                f"each of the {num_supernodes} SuperNodes"
            )
        commands = flower_commands(node_configs)
    log_dir = tmp_path / "logs"
    fleet_port, control_port = free_port(), free_port()
    fleet_address = f"{LOOPBACK}:{fleet_port}"
    with ExitStack() as stack:
        # Registered first, so it runs last: catches helpers that left the groups.
        stack.callback(stop_tagged_processes, env)
        superlink = stack.enter_context(
            started_process(
                "superlink",
                commands.superlink(fleet_address, control_port),
                component_env(env, tmp_path, "superlink"),
                log_dir,
            )
        )
        wait_for_port(control_port, process=superlink)
        wait_for_port(fleet_port, process=superlink)
        control_address = f"{LOOPBACK}:{control_port}"
        write_superlink_connection(
            env, connection_name, control_address, commands.root_certificates
        )
        processes = [superlink]

        def so_far() -> Deployment:
            return Deployment(
                connection_name=connection_name,
                env=env,
                control_address=control_address,
                fleet_address=fleet_address,
                processes=tuple(processes),
            )

        if before_supernodes is not None:
            before_supernodes(so_far())
        for index in range(num_supernodes):
            runtime_port = free_port()
            supernode = stack.enter_context(
                started_process(
                    f"supernode-{index}",
                    commands.supernode(fleet_address, runtime_port, index),
                    component_env(env, tmp_path, f"supernode-{index}"),
                    log_dir,
                )
            )
            wait_for_port(runtime_port, process=supernode)
            processes.append(supernode)
        wait_for_supernodes(env, connection_name, num_supernodes)
        yield so_far()


# Checking a run's results ----------------------------------------------------

ROUND_KEYS = (
    "round",
    "global_accuracy",
    "global_loss",
    "local_accuracy_mean",
    "local_accuracy_min",
    "local_accuracy_max",
)
_ACCURACY_KEYS = ROUND_KEYS[1:2] + ROUND_KEYS[3:]
_LOCAL_SIGMA_KEY = re.compile(r"noise[-_]local[-_]sigma")


def app_config_defaults(app_dir: Path) -> dict[str, object]:
    """Return ``[tool.flwr.app.config]`` of the App in ``app_dir``."""
    with (app_dir / "pyproject.toml").open("rb") as file:
        return dict(tomli.load(file)["tool"]["flwr"]["app"]["config"])


def results_files(results_dir: Path) -> list[Path]:
    """Return every ``<results_dir>/<run-name>/results.json``."""
    return sorted(results_dir.glob("*/results.json"))


def _config_key(key: str) -> str:
    return key.replace("_", "-")


def assert_complete_results(
    results_dir: Path,
    *,
    run_config: Mapping[str, bool | int | float | str],
    app_dir: Path,
    num_clients: int = 2,
    context: str = "",
) -> dict[str, object]:
    """Check the one run folder in ``results_dir``; return its ``results.json``.

    Parameters
    ----------
    results_dir : Path
        The run's ``results-dir``.
    run_config : Mapping[str, bool | int | float | str]
        The overrides the run was started with; must include
        ``num-server-rounds`` and ``local-noise-std``.
    app_dir : Path
        The App, whose default config must be recorded whole.
    num_clients : int
        How many clients must have replied in every round.
    context : str
        Appended to failure messages (e.g. the run's output).
    """
    (json_path,) = results_files(results_dir) or [None]
    assert json_path is not None, f"no results.json under {results_dir}\n{context}"
    results = json.loads(json_path.read_text())
    assert results["status"] == "complete", f"{results}\n{context}"

    recorded = {_config_key(key): value for key, value in results["config"].items()}
    missing = set(map(_config_key, app_config_defaults(app_dir))) - set(recorded)
    assert not missing, f"config keys not recorded: {sorted(missing)}"
    for key, value in run_config.items():
        assert recorded[_config_key(key)] == value, (key, recorded[_config_key(key)])

    rounds = results["rounds"]
    num_rounds = int(run_config["num-server-rounds"])
    assert [entry["round"] for entry in rounds] == list(range(1, num_rounds + 1))
    for entry in rounds:
        assert set(ROUND_KEYS) <= set(entry), entry
        assert entry["num_replies"] == num_clients, entry
        for key in _ACCURACY_KEYS:
            value = entry[key]
            assert isinstance(value, (int, float)) and 0.0 <= value <= 1.0, (
                f"round {entry['round']}: {key} = {value!r} is not in [0, 1]: {entry}"
            )
        assert (
            entry["local_accuracy_min"]
            <= entry["local_accuracy_mean"]
            <= entry["local_accuracy_max"]
        ), entry
        loss = entry["global_loss"]
        assert isinstance(loss, (int, float)) and 0.0 <= loss < math.inf, entry
        local_sigmas = [v for k, v in entry.items() if _LOCAL_SIGMA_KEY.fullmatch(k)]
        assert local_sigmas, f"no local noise sigma in round entry {entry}"
        assert all(
            math.isclose(sigma, float(run_config["local-noise-std"]))
            for sigma in local_sigmas
        ), entry

    with (json_path.parent / "results.csv").open(newline="") as file:
        csv_rows = list(csv.DictReader(file))
    assert [int(row["round"]) for row in csv_rows] == list(range(1, num_rounds + 1))
    assert set(ROUND_KEYS) <= set(csv_rows[0])
    png = (json_path.parent / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG"), "results.png is not a PNG image"
    return results
