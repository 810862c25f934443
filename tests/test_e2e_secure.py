"""End to end: the App on a SuperLink with TLS and SuperNode authentication.

Deployed with the scripts of examples/deployment/secure/, as a user would:
certificates and SuperNode keys made by the example scripts, a SuperLink with
TLS on every API and ``--enable-supernode-auth``, SuperNodes that verify it
with the CA certificate and sign in with registered keys. One deployment
serves every scenario: SuperNodes that must be turned away (unregistered key,
no key, no CA, the wrong CA), a run with the two authorized SuperNodes, and a
run in which one of three SuperNodes dies during the last round.

The fast tests at the end check the scripts' output and their argument checks.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from flower_processes import (
    FINISHED_COMPLETED,
    ComponentCommands,
    Deployment,
    StartedProcess,
    assert_complete_results,
    component_env,
    deployment,
    format_config_overrides,
    free_port,
    partition_node_configs,
    results_files,
    run_command,
    run_details,
    run_flwr,
    started_process,
    wait_for_supernodes,
)
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from test_e2e_deployment import assert_run_completed, example_scripts, venv_assignment

RunConfig = dict[str, bool | int | float | str]

AUTHORIZED = ("supernode-0", "supernode-1", "supernode-2")
UNREGISTERED = "intruder"
# SuperNodes 0 and 1 start with the deployment; 2 joins for the lost-node run.
NUM_FIRST_SUPERNODES = 2
NUM_PARTITIONS = len(AUTHORIZED)
# The round the killed SuperNode never answers ends after this many seconds
# (or sooner, once the SuperLink has missed its heartbeats: 36 to 60 s). Live
# ClientApps need 20 s for a round (process start, torch import, training) on
# a 2-core machine that is busy with other jobs.
ROUND_TIMEOUT_S = 45.0


def secure_scripts(app_dir: Path) -> Path:
    return example_scripts(app_dir) / "secure"


@dataclass(frozen=True)
class Credentials:
    """What the example scripts made: the deployment's CA, another CA, keys."""

    certs: Path
    other_certs: Path
    keys: Path

    @property
    def ca_cert(self) -> Path:
        return self.certs / "ca.crt"

    def private_key(self, name: str) -> Path:
        return self.keys / name

    def public_key(self, name: str) -> Path:
        return self.keys / f"{name}.pub"


def run_script(
    script: Path, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=cwd,
    )


@pytest.fixture
def credentials(app_dir: Path, tmp_path: Path) -> Credentials:
    scripts = secure_scripts(app_dir)
    made = Credentials(tmp_path / "certs", tmp_path / "other-certs", tmp_path / "keys")
    for result in (
        run_script(scripts / "generate-certs.sh", str(made.certs)),
        run_script(scripts / "generate-certs.sh", str(made.other_certs)),
        run_script(
            scripts / "generate-supernode-keys.sh",
            str(made.keys),
            *AUTHORIZED,
            UNREGISTERED,
        ),
    ):
        assert result.returncode == 0, result
    return made


def secure_supernode_command(
    scripts: Path,
    fleet_address: str,
    private_key: Path,
    ca_cert: Path,
    runtime_port: int,
    node_config: str,
) -> list[str]:
    """Start a SuperNode with start-supernode-secure.sh."""
    return [
        "env",
        venv_assignment(),
        f"CA_CERT={ca_cert}",
        f"SUPERNODE_PORT={runtime_port}",
        str(scripts / "start-supernode-secure.sh"),
        fleet_address,
        str(private_key),
        "--node-config",
        node_config,
    ]


def secure_script_commands(
    scripts: Path, credentials: Credentials, node_configs: list[str]
) -> ComponentCommands:
    """Start the components with the secure example scripts; SuperNode k
    signs in with key ``AUTHORIZED[k]``."""
    return ComponentCommands(
        superlink=lambda fleet_address, control_port: [
            "env",
            venv_assignment(),
            f"CERTS_DIR={credentials.certs}",
            f"FLEET_API_ADDRESS={fleet_address}",
            f"CONTROL_API_PORT={control_port}",
            str(scripts / "start-superlink-secure.sh"),
        ],
        supernode=lambda fleet_address, runtime_port, index: secure_supernode_command(
            scripts,
            fleet_address,
            credentials.private_key(AUTHORIZED[index]),
            credentials.ca_cert,
            runtime_port,
            node_configs[index],
        ),
        root_certificates=credentials.ca_cert,
    )


def register_supernode(link: Deployment, public_key: Path) -> int:
    """Register a SuperNode's public key; return the node id it gets."""
    result = run_command(
        ["flwr", "supernode", "register", str(public_key), link.connection_name]
        + ["--format", "json"],
        link.env,
        Path.cwd(),
        timeout_s=60.0,
    )
    assert result.returncode == 0, f"{result.output}\n{link.log_tails()}"
    return int(json.loads(result.output)["node-id"])


def supernode_statuses(link: Deployment) -> dict[int, str]:
    """Node id -> status (registered, online, offline) at the SuperLink."""
    result = run_command(
        ["flwr", "supernode", "ls", link.connection_name, "--format", "json"],
        link.env,
        Path.cwd(),
        timeout_s=60.0,
    )
    assert result.returncode == 0, result.output
    return {
        int(node["node-id"]): node["status"]
        for node in json.loads(result.output)["nodes"]
    }


def wait_for_exit(process: StartedProcess, timeout_s: float = 90.0) -> int:
    try:
        return process.popen.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{process.name} still runs after {timeout_s}s\n{process.log_tail()}"
        ) from None


def wait_for_log_line(
    process: StartedProcess, text: str, context: Callable[[], str], times: int = 1
) -> None:
    """Wait until the process has logged ``text`` ``times`` times."""
    deadline = time.monotonic() + 180.0
    while process.log_path.read_text(errors="replace").count(text) < times:
        assert process.is_running() and time.monotonic() < deadline, (
            f"{process.name} logged {text!r} fewer than {times} times\n{context()}"
        )
        time.sleep(0.05)


@dataclass(frozen=True)
class RefusedSuperNode:
    """A SuperNode the SuperLink must turn away, and what its log must say."""

    name: str
    command: Callable[[int], list[str]]  # its Runtime API port -> command
    log_says: str


def refused_supernodes(
    scripts: Path, credentials: Credentials, fleet_address: str
) -> list[RefusedSuperNode]:
    # The TLS cases sign in with supernode-2's key, registered but not in use
    # yet: only the missing trust in the SuperLink's certificate stops them.
    registered_key = credentials.private_key(AUTHORIZED[2])
    node_config = partition_node_configs(NUM_PARTITIONS)[2]
    tls_failure = "CERTIFICATE_VERIFY_FAILED"

    def plain_supernode(*flags: str) -> Callable[[int], list[str]]:
        return lambda port: [
            "flower-supernode",
            "--superlink",
            fleet_address,
            "--port",
            str(port),
            *flags,
        ]

    return [
        RefusedSuperNode(
            "unregistered-key",
            lambda port: secure_supernode_command(
                scripts,
                fleet_address,
                credentials.private_key(UNREGISTERED),
                credentials.ca_cert,
                port,
                node_config,
            ),
            "Failed to activate SuperNode",
        ),
        RefusedSuperNode(
            "no-key",  # would register itself with a fresh key, were it allowed
            plain_supernode("--root-certificates", str(credentials.ca_cert)),
            "All SuperNodes must be registered via the CLI",
        ),
        RefusedSuperNode(
            "no-ca",  # trusts the system's CAs only
            plain_supernode("--auth-supernode-private-key", str(registered_key)),
            tls_failure,
        ),
        RefusedSuperNode(
            "wrong-ca",
            lambda port: secure_supernode_command(
                scripts,
                fleet_address,
                registered_key,
                credentials.other_certs / "ca.crt",
                port,
                node_config,
            ),
            tls_failure,
        ),
    ]


@pytest.mark.slow
def test_secure_deployment_admits_registered_supernodes_only_and_survives_a_lost_one(
    app_dir: Path,
    flower_env: dict[str, str],
    tiny_run_config: RunConfig,
    tmp_path: Path,
    credentials: Credentials,
) -> None:
    scripts = secure_scripts(app_dir)
    node_configs = partition_node_configs(NUM_PARTITIONS)
    commands = secure_script_commands(scripts, credentials, node_configs)
    node_ids: dict[str, int] = {}

    def register_authorized_keys(link: Deployment) -> None:
        for name in AUTHORIZED:
            node_ids[name] = register_supernode(link, credentials.public_key(name))

    with (
        deployment(
            tmp_path,
            NUM_FIRST_SUPERNODES,
            env=flower_env,
            commands=commands,
            before_supernodes=register_authorized_keys,
        ) as running,
        ExitStack() as extra_supernodes,
    ):

        def start_supernode(name: str, command: Callable[[int], list[str]]):
            return extra_supernodes.enter_context(
                started_process(
                    name,
                    command(free_port()),
                    component_env(running.env, tmp_path, name),
                    tmp_path / "logs",
                )
            )

        # Turned away: each exits with an error and never comes online.
        refused = refused_supernodes(scripts, credentials, running.fleet_address)
        started = [(case, start_supernode(case.name, case.command)) for case in refused]
        for case, process in started:
            returncode = wait_for_exit(process)
            log = process.log_path.read_text(errors="replace")
            assert returncode != 0 and case.log_says in log, process.log_tail()
        superlink_log = running.processes[0].log_path.read_text(errors="replace")
        assert "No SuperNode found with the given public key" in superlink_log
        # The key-less SuperNode got no node id; supernode-2's key never got in.
        assert supernode_statuses(running) == {
            node_ids["supernode-0"]: "online",
            node_ids["supernode-1"]: "online",
            node_ids["supernode-2"]: "registered",
        }

        # The two authorized SuperNodes run the App over TLS.
        run_config: RunConfig = {**tiny_run_config, "num-server-rounds": 1}
        result = run_flwr(
            app_dir,
            [
                running.connection_name,
                "--stream",
                "--run-config",
                format_config_overrides(run_config),
            ],
            running.env,
        )
        context = assert_run_completed(result, running, running.connection_name)
        assert_complete_results(
            Path(str(run_config["results-dir"])),
            run_config=run_config,
            app_dir=app_dir,
            num_clients=NUM_FIRST_SUPERNODES,
            context=context,
        )

        # A third SuperNode joins, and dies (SIGKILL, as in a crash) when the
        # last round reaches it: no goodbye to the SuperLink, no reply.
        third = start_supernode(
            AUTHORIZED[2],
            lambda port: commands.supernode(running.fleet_address, port, 2),
        )
        wait_for_supernodes(running.env, running.connection_name, NUM_PARTITIONS)
        lost_node_config: RunConfig = {
            **tiny_run_config,
            "round-timeout": ROUND_TIMEOUT_S,
            "results-dir": str(tmp_path / "results-lost-node"),
        }
        num_rounds = int(lost_node_config["num-server-rounds"])
        started_run = run_flwr(  # without --stream: returns once the run started
            app_dir,
            [
                running.connection_name,
                "--run-config",
                format_config_overrides(lost_node_config),
            ],
            running.env,
        )

        def lost_node_context() -> str:
            return f"{started_run.output}\n{running.log_tails()}\n{third.log_tail()}"

        wait_for_log_line(
            third, "Receiving: train message", lost_node_context, num_rounds
        )
        os.killpg(third.popen.pid, signal.SIGKILL)
        details = run_details(
            running.env,
            started_run.run_id,
            running.connection_name,
            timeout_s=300.0,
        )
        assert details["status"] == FINISHED_COMPLETED, (details, lost_node_context())

    (results_path,) = results_files(Path(str(lost_node_config["results-dir"])))
    results = json.loads(results_path.read_text())
    assert results["status"] == "complete", results
    rounds = results["rounds"]
    assert [entry["round"] for entry in rounds] == list(range(1, num_rounds + 1))
    # All three answered until the last round; in it, only the two live ones.
    expected_replies = [NUM_PARTITIONS] * (num_rounds - 1) + [NUM_FIRST_SUPERNODES]
    assert [entry["num_replies"] for entry in rounds] == expected_replies, rounds


# The example scripts on their own (fast) -------------------------------------


def test_generate_certs_signs_a_server_certificate_for_loopback_and_given_names(
    app_dir: Path, tmp_path: Path
) -> None:
    result = run_script(
        secure_scripts(app_dir) / "generate-certs.sh",
        str(tmp_path),
        "superlink.example.org",
        "192.0.2.10",
    )

    assert result.returncode == 0, result
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert set(names.value.get_values_for_type(x509.DNSName)) == {
        "localhost",
        "superlink.example.org",
    }
    assert set(names.value.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("192.0.2.10"),
    }
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(usage.value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for private_key in ("ca.key", "server.key"):
        assert (tmp_path / private_key).stat().st_mode & 0o077 == 0, private_key


@pytest.mark.parametrize(
    "names",
    [
        ["not a name"],
        ["superlink.example.org;rm"],
        ["192.0.2.1,DNS:attacker.example.com"],  # would add a SAN
        ["::1,DNS:attacker.example.com"],
        ["superlink.example.org\nbasicConstraints=critical,CA:TRUE"],  # extension
        ["IP:192.0.2.1"],
        ["999.0.2.1"],
        ["a/CN=evil"],  # would add a subject field
        ["superlink.example.org", "-bad.example.org"],
        ["1::2::3"],
    ],
)
def test_generate_certs_rejects_bad_names(
    app_dir: Path, tmp_path: Path, names: list[str]
) -> None:
    result = run_script(
        secure_scripts(app_dir) / "generate-certs.sh", str(tmp_path / "c"), *names
    )

    assert result.returncode == 2, result
    assert result.stderr.startswith("error: NAME_OR_IP="), result.stderr
    assert not (tmp_path / "c").exists()


def test_a_failed_generate_certs_leaves_no_half_ca(
    app_dir: Path, tmp_path: Path
) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "openssl"  # fails when the CA signs the server certificate
    real = shutil.which("openssl")
    fake.write_text(f'#!/bin/sh\n[ "$1" = x509 ] && exit 1\nexec {real} "$@"\n')
    fake.chmod(0o755)
    script = secure_scripts(app_dir) / "generate-certs.sh"
    out = tmp_path / "out" / "certs"
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"}

    failed = run_script(script, str(out), "superlink.example.org", env=env)

    assert failed.returncode != 0, failed
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary folder left
    assert run_script(script, str(out), "superlink.example.org").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "ca.crt",
        "ca.key",
        "server.key",
        "server.pem",
    ]


def test_generate_certs_keeps_an_existing_ca(app_dir: Path, tmp_path: Path) -> None:
    script = secure_scripts(app_dir) / "generate-certs.sh"
    assert run_script(script, str(tmp_path)).returncode == 0
    ca_before = (tmp_path / "ca.crt").read_bytes()

    result = run_script(script, str(tmp_path))

    assert result.returncode == 2, result
    assert result.stderr.startswith("error: OUTPUT_DIR="), result.stderr
    assert (tmp_path / "ca.crt").read_bytes() == ca_before


def test_generate_supernode_keys_writes_pairs_that_flower_reads(
    app_dir: Path, tmp_path: Path
) -> None:
    result = run_script(
        secure_scripts(app_dir) / "generate-supernode-keys.sh",
        str(tmp_path),
        "supernode-0",
        "supernode-1",
    )

    assert result.returncode == 0, result
    registered = set()
    for name in ("supernode-0", "supernode-1"):
        # As `flwr supernode register` and `flower-supernode` read them.
        public_key = try_load_public_key(tmp_path / f"{name}.pub")
        private_key = load_ssh_private_key((tmp_path / name).read_bytes(), None)
        assert public_key_to_bytes(private_key.public_key()) == public_key
        assert (tmp_path / name).stat().st_mode & 0o077 == 0
        registered.add(public_key)
    assert len(registered) == 2


@pytest.mark.parametrize(
    ("script", "args", "env_overrides", "message"),
    [
        ("generate-supernode-keys.sh", ["keys"], {}, "usage:"),
        ("generate-supernode-keys.sh", ["keys", "../x"], {}, "error: NAME="),
        ("start-supernode-secure.sh", ["127.0.0.1:9092"], {}, "usage:"),
        (
            "start-supernode-secure.sh",
            ["127.0.0.1:9092", "/no/such/key"],
            {},
            "error: PRIVATE_KEY=",
        ),
        ("start-superlink-secure.sh", [], {"CERTS_DIR": "/no/such"}, "error: "),
    ],
)
def test_secure_scripts_reject_bad_arguments(
    app_dir: Path,
    tmp_path: Path,
    script: str,
    args: list[str],
    env_overrides: dict[str, str],
    message: str,
) -> None:
    result = run_script(
        secure_scripts(app_dir) / script,
        *args,
        env={**os.environ, **env_overrides},
        cwd=tmp_path,
    )

    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr.startswith(message), result.stderr
    assert not (tmp_path / "keys").exists()
