"""Tests for simplemesh.py, in the order of its sections.

Pure functions are tested directly; everything else starts real nodes on loopback and sends real HTTP.
Run with ``python3 -m unittest -v`` (stdlib only); the tests that drive external tools (promtool, Prometheus,
Chromium, kubectl, opentelemetry-proto) need what ``.ci/run`` installs and fail, never skip, in CI without them.
"""

import http.client
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from dataclasses import replace

import simplemesh as sm

HERE = os.path.dirname(os.path.abspath(__file__))
IN_CI = os.environ.get("CI") == "true"


def require_tool(testcase, name):
    """The path of executable ``name``; a missing tool fails the test in CI (where .ci/run installs it), else skips."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it)"
        testcase.fail(message) if IN_CI else testcase.skipTest(message)
    return path


def require_module(testcase, name):
    """Import a test-only package from requirements-test.txt, failing in CI and skipping elsewhere without it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        message = f"Python package {name} is not installed (pip install -r requirements-test.txt)"
        testcase.fail(message) if IN_CI else testcase.skipTest(message)


# --- Harness: real nodes on loopback -------------------------------------------------------------------------

class Mesh:
    """Nodes started in this process on free loopback ports, resolving each other through one shared PEERS map.

    ``Mesh({"a": {}, "b": {"delay": "1s"}}, max_calls=5)``: node name -> directive defaults; keyword arguments
    become Config fields of every node. Use as a context manager, or call close().
    """

    def __init__(self, nodes, address="127.0.0.1", **config):
        self.peers = {}
        self.servers = {}
        for name, defaults in nodes.items():
            node_config = sm.Config(host=name, port=0, address=address, peers=self.peers,
                                    defaults=dict(defaults), log_level="warning", **config)
            server = sm.Server(sm.Node(node_config))
            self.servers[name] = server
            self.peers[name] = [(address, server.server_address[1])]
        for server in self.servers.values():
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def port(self, name):
        return self.servers[name].server_address[1]

    def node(self, name):
        return self.servers[name].node

    def request(self, name, path, method="GET", body=None, headers=None, timeout=30):
        """(status, headers, parsed JSON or text) of one request to node ``name``."""
        return http_request(self.peers[name][0], path, method, body, headers, timeout)

    def close(self):
        for server in self.servers.values():
            server.shutdown()
            server.server_close()
            server.node.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def http_request(address, path, method="GET", body=None, headers=None, timeout=30):
    connection = http.client.HTTPConnection(*address, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        answer_headers = {k.lower(): v for k, v in response.getheaders()}
        if "json" in answer_headers.get("content-type", "") and data:
            return response.status, answer_headers, json.loads(data)
        return response.status, answer_headers, data.decode("utf-8", "replace")
    finally:
        connection.close()


def hosts(record):
    """The tree of hosts in a record, as nested lists: {"host": "a", "next_node": [b]} -> ["a", [...]]."""
    return [record["host"], [hosts(child) for child in record.get("next_node", [])]]


def run_cli(*args, env=None, timeout=30, input=None):
    """Run ``python3 -I -S simplemesh.py ARGS`` as the distroless image would (no site-packages)."""
    return subprocess.run([sys.executable, "-I", "-S", os.path.join(HERE, "simplemesh.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, input=input)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, timeout=10.0, address="127.0.0.1"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {address}:{port} after {timeout}s")


# --- Configuration --------------------------------------------------------------------------------------------

# --- Route grammar --------------------------------------------------------------------------------------------

# --- Directives -----------------------------------------------------------------------------------------------

# --- Trace context --------------------------------------------------------------------------------------------

# --- Outbound calls -------------------------------------------------------------------------------------------

# --- The answer and its views ---------------------------------------------------------------------------------

# --- Metrics --------------------------------------------------------------------------------------------------

# --- Span export ----------------------------------------------------------------------------------------------

# --- The node over HTTP ---------------------------------------------------------------------------------------

# --- Robustness -----------------------------------------------------------------------------------------------

# --- Command line ---------------------------------------------------------------------------------------------

# --- Packaging ------------------------------------------------------------------------------------------------

# The demo mesh of manifests/base, as the generator's arguments (manifests/base/kustomization.yaml says the same).
DEMO_NODES = ("a;delay=0.5", "b;delay=1", "b;delay=1;version=v2", "c;delay=1.5", "d")
DEMO_OPTIONS = ("--load", "http://a/b/c/d", "--rate", "2", "--concurrency", "8")
# kubernetes-validate ships the schemas; strict ones also refuse unknown fields (a typo is an error).
K8S_SCHEMA_VERSION = "1.30.0"
ISTIO_REQUIRED = {"Gateway": ("selector", "servers"), "VirtualService": ("hosts",),
                  "DestinationRule": ("host",)}


def generate(*args):
    """The YAML text of ``simplemesh manifests ARGS``, run as the image runs it."""
    result = run_cli("manifests", *args)
    if result.returncode != 0:
        raise AssertionError(f"manifests {args} failed: {result.stderr}")
    return result.stdout


def node_deployments(objects):
    return [o for o in objects if o["kind"] == "Deployment"
            and o["metadata"]["labels"].get("app.kubernetes.io/component") == "node"]


def container_env(deployment, labels=None, pod="pod-0"):
    """The environment the kubelet would give the container: literal values and the downward API resolved."""
    template = deployment["spec"]["template"]
    labels = labels or template["metadata"]["labels"]
    fields = {"metadata.name": pod, "metadata.namespace": "default", "status.podIP": "10.0.0.7",
              "spec.nodeName": "node-1"}
    fields.update({f"metadata.labels['{k}']": v for k, v in labels.items()})
    env = {}
    for item in template["spec"]["containers"][0].get("env", []):
        env[item["name"]] = item["value"] if "value" in item else fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def by_kind_and_name(objects):
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


class TestManifestYaml(unittest.TestCase):
    """The hand-written YAML emitter: strings that a YAML reader would retype are quoted."""

    def test_scalars(self):
        self.assertEqual(sm.yaml_scalar("simplemesh:0.1.0"), "simplemesh:0.1.0")
        self.assertEqual(sm.yaml_scalar("/readyz"), "/readyz")
        self.assertEqual(sm.yaml_scalar(True), "true")
        self.assertEqual(sm.yaml_scalar(9090), "9090")
        for text in ("true", "No", "on", "y", "null", "9090", "0.5", "1:30", "", " a", "a: b", "#x", "a:",
                     "metadata.labels['app']", "*", "-", "@x", "é"):
            with self.subTest(text=text):
                self.assertTrue(sm.yaml_scalar(text).startswith('"'), sm.yaml_scalar(text))

    def test_round_trip_through_a_yaml_parser(self):
        yaml = require_module(self, "yaml")
        tricky = {"strings": ["yes", "0.5", "1:30", "", "a: b", "#c", "line\nbreak", 'q"uote', "é", "~", "-1",
                              "simplemesh:0.1.0", "$(POD_NAME),k=v"],
                  "empty": {}, "none": [], "nested": [[1, 2], {"k": [{"a": {"b": False}}]}], "n": 3, "f": 0.25}
        documents = [tricky] + sm.build_manifests([sm.parse_node_spec(s) for s in DEMO_NODES], istio=True,
                                                  otlp="http://collector:4318", load="http://a/b")
        self.assertEqual(list(yaml.safe_load_all(sm.to_yaml(documents))), documents)


class TestManifestGenerator(unittest.TestCase):
    """build_manifests() on its own: what every pod gets, and clear errors for bad input."""

    def build(self, *specs, **options):
        return sm.build_manifests([sm.parse_node_spec(s) for s in specs], **options)

    def test_service_and_a_deployment_per_version(self):
        objects = by_kind_and_name(self.build("a", "b;delay=1", "b;delay=1;version=v2"))
        self.assertEqual(sorted(objects), [("Deployment", "a-v1"), ("Deployment", "b-v1"), ("Deployment", "b-v2"),
                                           ("Service", "a"), ("Service", "b")])
        service = objects["Service", "b"]
        self.assertEqual(service["spec"]["ports"], [{"name": "http", "port": 80, "targetPort": "http",
                                                     "appProtocol": "http"}])
        for version in ("v1", "v2"):
            deployment = objects["Deployment", f"b-{version}"]
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            self.assertEqual(labels["app"], "b")
            self.assertEqual(labels["version"], version)
            self.assertEqual(labels["app.kubernetes.io/name"], "b")
            self.assertLessEqual(service["spec"]["selector"].items(), labels.items())
            self.assertLessEqual(deployment["spec"]["selector"]["matchLabels"].items(), labels.items())
            self.assertEqual(deployment["spec"]["template"]["spec"]["containers"][0]["ports"],
                             [{"name": "http", "containerPort": 9090, "protocol": "TCP"}])

    def test_pods_are_restricted_probed_limited_and_scraped(self):
        for deployment in [o for o in self.build("a", "b;version=v2", load="http://a/b") if o["kind"] == "Deployment"]:
            name = deployment["metadata"]["name"]
            pod = deployment["spec"]["template"]["spec"]
            container, = pod["containers"]
            with self.subTest(deployment=name):
                self.assertEqual(pod["securityContext"]["seccompProfile"], {"type": "RuntimeDefault"})
                self.assertIs(pod["securityContext"]["runAsNonRoot"], True)
                self.assertEqual(pod["securityContext"]["runAsUser"], 65532)
                self.assertIs(pod["automountServiceAccountToken"], False)
                security = container["securityContext"]
                self.assertIs(security["allowPrivilegeEscalation"], False)
                self.assertIs(security["readOnlyRootFilesystem"], True)
                self.assertIs(security["runAsNonRoot"], True)
                self.assertEqual(security["capabilities"], {"drop": ["ALL"]})
                for kind in ("requests", "limits"):
                    self.assertEqual(set(container["resources"][kind]), {"cpu", "memory"})
                if name == "loadgen-v1":
                    self.assertEqual(container["args"], ["load", "http://a/b", "--rate", "5", "--duration", "0"])
                    continue
                self.assertEqual(container["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "http"})
                self.assertEqual(container["livenessProbe"]["httpGet"], {"path": "/healthz", "port": "http"})
                annotations = deployment["spec"]["template"]["metadata"]["annotations"]
                self.assertEqual(annotations["prometheus.io/scrape"], "true")
                self.assertEqual(annotations["prometheus.io/port"], "9090")
                self.assertEqual(annotations["prometheus.io/path"], "/metrics")

    def test_termination_outlasts_the_servers_shutdown(self):
        deployment, = [o for o in self.build("a") if o["kind"] == "Deployment"]
        config = sm.Config.from_env(container_env(deployment))
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        self.assertGreater(config.shutdown_delay, 0)
        self.assertGreater(grace, config.shutdown_delay + config.shutdown_grace)

    def test_environment_configures_the_node(self):
        objects = by_kind_and_name(self.build("c;delay=100ms..200ms;error=0.2;status=503;parallel;headers;"
                                              "timeout=2s;size=1k;cpu=10ms;reset=0.01;version=v3",
                                              otlp="http://collector:4318"))
        deployment = objects["Deployment", "c-v3"]
        raw = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        self.assertIn({"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}}, raw)
        env = container_env(deployment)
        self.assertEqual(env["DELAY"], "100ms..200ms")
        self.assertEqual(env["FANOUT"], "parallel")
        self.assertEqual(env["OTEL_EXPORTER_OTLP_ENDPOINT"], "http://collector:4318")
        names = [item["name"] for item in raw]  # $(VAR) only expands variables defined before it
        self.assertGreater(names.index("OTEL_RESOURCE_ATTRIBUTES"), names.index("NODE_NAME"))
        config = sm.Config.from_env(env)
        self.assertEqual((config.host, config.version, config.port), ("c", "v3", 9090))
        self.assertEqual(config.identity, {"pod": "pod-0", "namespace": "default", "ip": "10.0.0.7",
                                           "node": "node-1"})
        self.assertEqual(config.defaults, {"delay": "100ms..200ms", "error": "0.2", "status": "503",
                                           "reset": "0.01", "size": "1k", "cpu": "10ms", "timeout": "2s",
                                           "parallel": "true", "headers": "true"})

    def test_istio_resources(self):
        objects = by_kind_and_name(self.build("a", "b", "b;version=v2", "b;version=v3", istio=True))
        namespace = objects["Namespace", "simplemesh"]
        self.assertEqual(namespace["metadata"]["labels"]["istio-injection"], "enabled")
        self.assertTrue(all(o["metadata"].get("namespace") == "simplemesh"
                            for key, o in objects.items() if key[0] != "Namespace"))
        ingress = objects["VirtualService", "simplemesh-ingress"]
        self.assertEqual(ingress["spec"]["gateways"], ["simplemesh"])
        self.assertEqual(ingress["spec"]["http"][0]["route"][0]["destination"]["host"], "a")
        self.assertEqual([s["name"] for s in objects["DestinationRule", "b"]["spec"]["subsets"]], ["v1", "v2", "v3"])
        route = objects["VirtualService", "b"]["spec"]["http"][0]["route"]
        self.assertEqual(sum(r["weight"] for r in route), 100)
        self.assertNotIn(("VirtualService", "a"), objects)  # one version: nothing to split

    def test_bad_input_is_refused(self):
        cases = {("1a",): "DNS label", ("a.b",): "DNS label", ("a", "a"): "twice", ("a;delay=10m",): "MAX_DELAY",
                 ("a;bogus=1",): "unknown directive", ("a;version=V_2",): "bad version", (): "at least one"}
        for specs, message in cases.items():
            with self.subTest(specs=specs), self.assertRaisesRegex(ValueError, message):
                self.build(*specs)
        for options, message in (({"namespace": "Bad_NS"}, "namespace"), ({"otlp": "collector:4318"}, "OTLP"),
                                 ({"load": "a/b"}, "load URL"), ({"load": "http://a", "rate": "0"}, "rate"),
                                 ({"image": "a b"}, "image")):
            with self.subTest(options=options), self.assertRaisesRegex(ValueError, message):
                self.build("a", **options)
        with self.assertRaisesRegex(ValueError, "load generator"):
            self.build("loadgen", load="http://a/")

    def test_command_line_errors_are_one_clear_line(self):
        result = run_cli("manifests", "a;delay=forever")
        self.assertEqual(result.returncode, 2)
        self.assertIn("bad duration", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertEqual(run_cli("manifests").returncode, 2)  # argparse: at least one NODE
        self.assertIn("--istio", run_cli("manifests", "--help").stdout)


class TestManifestsRunLocally(unittest.TestCase):
    """The generated environment, given to real nodes on loopback, makes the mesh the specs describe."""

    def test_generated_pods_answer_as_specified(self):
        objects = sm.build_manifests([sm.parse_node_spec(s) for s in ("a", "b;delay=50ms;version=v2")])
        servers, peers = [], {}
        try:
            for deployment in node_deployments(objects):
                env = container_env(deployment, pod=deployment["metadata"]["name"] + "-xyz")
                env.update(PORT="0", ADDRESS="127.0.0.1", LOG_LEVEL="warning")
                config = replace(sm.Config.from_env(env), peers=peers)
                server = sm.start_node(config)
                servers.append(server)
                peers[config.host] = [("127.0.0.1", server.server_address[1])]
            status, _headers, answer = http_request(peers["a"][0], "/b")
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()
                server.node.pool.close()
        self.assertEqual(status, 200)
        self.assertEqual((answer["host"], answer["version"], answer["pod"]), ("a", "v1", "a-v1-xyz"))
        child, = answer["next_node"]
        self.assertEqual((child["host"], child["version"], child["pod"]), ("b", "v2", "b-v2-xyz"))
        self.assertGreaterEqual(child["elapsed_time"], 0.05)


class TestManifestsValidate(unittest.TestCase):
    """Generated and static manifests against the Kubernetes schemas, and through kubectl kustomize."""

    def setUp(self):
        self.yaml = require_module(self, "yaml")
        self.validator = require_module(self, "kubernetes_validate")

    def check_objects(self, objects, source):
        """Kubernetes kinds against the strict schemas; Istio CRDs (not in those schemas) by their structure."""
        self.assertTrue(objects, f"{source}: no objects")
        for obj in objects:
            kind, name = obj.get("kind"), obj.get("metadata", {}).get("name")
            with self.subTest(source=source, kind=kind, name=name):
                if obj["apiVersion"].startswith("networking.istio.io/"):
                    self.assertEqual(obj["apiVersion"], "networking.istio.io/v1")
                    self.assertRegex(name, r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
                    for required in ISTIO_REQUIRED[kind]:
                        self.assertIn(required, obj["spec"])
                    for route in obj["spec"].get("http", []):
                        weights = [d.get("weight") for d in route["route"] if "weight" in d]
                        self.assertIn(sum(weights), (0, 100))
                    continue
                try:
                    self.validator.validate(obj, K8S_SCHEMA_VERSION, strict=True)
                except self.validator.ValidationError as error:
                    self.fail(f"{source}: {kind}/{name}: {error.message} at {list(error.path)}")

    def kustomize(self, directory):
        kubectl = require_tool(self, "kubectl")
        result = subprocess.run([kubectl, "kustomize", os.path.join(HERE, "manifests", directory)],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        return list(self.yaml.safe_load_all(result.stdout))

    def test_generated_manifests_validate(self):
        for args in ((*DEMO_NODES, *DEMO_OPTIONS), ("a", "b;version=v2", "--istio", "--otlp", "http://c:4318"),
                     ("x;parallel;headers", "--namespace", "lab", "--image", "registry.example/simplemesh:1")):
            self.check_objects(list(self.yaml.safe_load_all(generate(*args))), " ".join(args))

    def test_static_manifests_validate(self):
        paths = []
        for root, _dirs, files in os.walk(os.path.join(HERE, "manifests")):
            paths += [os.path.join(root, f) for f in files if f.endswith(".yaml") and f != "kustomization.yaml"]
        self.assertGreaterEqual(len(paths), 7)
        for path in paths:
            with open(path, encoding="utf-8") as file:
                self.check_objects([o for o in self.yaml.safe_load_all(file) if o], os.path.relpath(path, HERE))

    def test_kustomize_base_is_the_generators_output(self):
        with open(os.path.join(HERE, "manifests", "base", "mesh.yaml"), encoding="utf-8") as file:
            self.assertEqual(file.read(), generate(*DEMO_NODES, *DEMO_OPTIONS),
                             "manifests/base/mesh.yaml is stale: regenerate it with the command in "
                             "manifests/base/kustomization.yaml")
        built = self.kustomize("base")
        self.check_objects(built, "kustomize base")
        self.assertEqual(by_kind_and_name(built), by_kind_and_name(self.yaml.safe_load_all(
            generate(*DEMO_NODES, *DEMO_OPTIONS))))

    def test_istio_overlay_is_the_generators_istio_output(self):
        built = self.kustomize("istio")
        self.check_objects(built, "kustomize istio")
        expected = self.yaml.safe_load_all(generate(*DEMO_NODES, *DEMO_OPTIONS, "--istio", "--namespace",
                                                    "simplemesh"))
        self.assertEqual(by_kind_and_name(built), by_kind_and_name(expected))

    def test_otel_overlay_is_the_generators_otlp_output(self):
        built = self.kustomize("otel")
        self.check_objects(built, "kustomize otel")
        expected = by_kind_and_name(self.yaml.safe_load_all(
            generate(*DEMO_NODES, *DEMO_OPTIONS, "--otlp", "http://otel-collector:4318")))
        built = by_kind_and_name(built)
        for key in ("Deployment", "otel-collector"), ("Service", "otel-collector"), ("ConfigMap", "otel-collector"):
            self.assertIn(key, built)
        self.assertEqual({key: built[key] for key in expected}, expected)


class TestDockerfile(unittest.TestCase):
    """No container engine runs here, so the Dockerfile is checked by reading it (and the image is not built)."""

    def instructions(self):
        with open(os.path.join(HERE, "Dockerfile"), encoding="utf-8") as file:
            lines = [line.strip() for line in file if line.strip() and not line.lstrip().startswith("#")]
        return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]

    def test_distroless_nonroot_one_file(self):
        instructions = self.instructions()
        keywords = [keyword for keyword, _ in instructions]
        self.assertEqual(dict(instructions)["FROM"].split(":")[0], "gcr.io/distroless/python3-debian12")
        self.assertEqual(keywords.count("FROM"), 1)
        self.assertNotIn("RUN", keywords)  # no package install: distroless has no shell anyway
        self.assertEqual(dict(instructions)["USER"].split(":")[0], "65532")
        self.assertEqual([arg for keyword, arg in instructions if keyword in ("COPY", "ADD")],
                         ["simplemesh.py /app/simplemesh.py"])
        self.assertEqual(dict(instructions)["EXPOSE"], "9090")
        entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])
        self.assertEqual(entrypoint[0], "/usr/bin/python3")
        self.assertEqual(entrypoint[-1], "/app/simplemesh.py")
        self.assertEqual(json.loads(dict(instructions)["CMD"]), ["serve"])
        self.assertIn("PYTHONDONTWRITEBYTECODE=1", dict(instructions)["ENV"])  # read-only root filesystem
        # The generated Deployments run this image as it is: same user, and the load generator's args fit CMD.
        deployment = next(o for o in sm.build_manifests([("a", "", {})]) if o["kind"] == "Deployment")
        self.assertEqual(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"], 65532)

    def test_entrypoint_runs_the_module_as_the_image_would(self):
        result = run_cli("serve", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_build_context_is_only_the_module(self):
        with open(os.path.join(HERE, ".dockerignore"), encoding="utf-8") as file:
            patterns = [line.strip() for line in file if line.strip() and not line.startswith("#")]
        self.assertEqual(patterns, ["*", "!simplemesh.py"])


class TestWheel(unittest.TestCase):
    """``pip install .`` into a fresh venv gives a working ``simplemesh`` command (setuptools comes from PyPI)."""

    def test_pip_install_gives_a_working_command(self):
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "src")
            os.mkdir(source)
            for name in ("pyproject.toml", "simplemesh.py", "README.md"):  # not the worktree: pip writes build/
                if os.path.exists(os.path.join(HERE, name)):
                    shutil.copy(os.path.join(HERE, name), source)
            venv = os.path.join(tmp, "venv")
            # A venv without its own pip, filled by this interpreter's pip: the same install, seconds faster.
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
            python = os.path.join(venv, "bin", "python")
            install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                                      "--disable-pip-version-check", source],
                                     capture_output=True, text=True, timeout=300)
            self.assertEqual(install.returncode, 0, install.stderr)
            metadata = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.requires('simplemesh'))"],
                                      capture_output=True, text=True, timeout=30)
            self.assertEqual(metadata.stdout.strip(), "None")  # no dependencies
            command = os.path.join(venv, "bin", "simplemesh")
            helped = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=30)
            self.assertEqual(helped.returncode, 0, helped.stderr)
            self.assertIn("manifests", helped.stdout)
            port = free_port()
            env = {"PATH": os.environ.get("PATH", ""), "HOST": "wheel", "PORT": str(port), "ADDRESS": "127.0.0.1",
                   "SHUTDOWN_GRACE": "1"}
            server = subprocess.Popen([command, "serve"], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, cwd=tmp)
            try:
                wait_for_port(port)
                status, _headers, answer = http_request(("127.0.0.1", port), "/")
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=15)
                server.stderr.close()
            self.assertEqual((status, answer["host"]), (200, "wheel"))
            self.assertEqual(server.returncode, 0)


if __name__ == "__main__":
    unittest.main()
