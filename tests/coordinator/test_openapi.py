"""The OpenAPI document matches the routes, and fuzzing it never produces a 5xx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from novacron.coordinator.api.openapi import API_PREFIX
from novacron.coordinator.local import LocalCoordinator
from tests.coordinator.conftest import Coordinator


async def test_document_lists_exactly_the_served_routes(coordinator: Coordinator) -> None:
    async with coordinator.session.get(coordinator.url + "/api/v1/openapi.json") as resp:
        assert resp.status == 200
        doc = await resp.json()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    app = coordinator.server.app
    assert app is not None
    served = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.method != "HEAD"
              and r.resource.canonical.startswith(API_PREFIX)}
    assert documented == served
    assert doc["openapi"].startswith("3.")
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for code, response in op["responses"].items():
                for content in response.get("content", {}).values():
                    jsonschema.Draft202012Validator.check_schema(content["schema"])
            if path != "/api/v1/health" and not path.endswith("openapi.json"):
                assert op["security"] == [{"bearer": []}], (method, path)
                assert "401" in op["responses"]


@pytest.mark.slow
@pytest.mark.e2e
async def test_schemathesis_finds_no_server_errors(tmp_path: Path) -> None:
    """Fuzz every documented route of a real coordinator subprocess.

    Routes of this module's resources (meta, hosts, vms, migrations) must never
    answer 5xx with an empty fleet. Other features' routes may answer a 5xx
    they document (e.g. 503 while a dependency is unavailable), but never an
    undocumented status, and nothing may raise an unhandled error (the only
    source of 500s).
    """
    async with LocalCoordinator(tmp_path / "coord") as coord:
        def run(token: str, checks: str, *select: str) -> None:
            argv = [sys.executable, "-m", "schemathesis.cli", "run",
                    f"{coord.url}/api/v1/openapi.json", "--checks", checks,
                    "--max-examples", "25", "--seed", "5", "--workers", "1",
                    "--phases", "examples,coverage,fuzzing", "--request-timeout", "10",
                    "--generation-database", "none", "--no-color",
                    "-H", f"Authorization: Bearer {token}", *select]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                                  cwd=tmp_path)
            out = proc.stdout + proc.stderr
            assert proc.returncode == 0, out[-6000:]
            assert "Tested:" in out
            assert token not in out

        agent_routes = "/hosts/(register|\\{name\\}/heartbeat)$"
        mine = ["--include-tag-regex", "^(meta|hosts|vms|migrations)$"]
        strict = "not_a_server_error,status_code_conformance,content_type_conformance," \
                 "response_schema_conformance"
        run(coord.admin_token, strict, *mine, "--exclude-path-regex", agent_routes)
        run(coord.agent_token, strict, "--include-path-regex", agent_routes)
        run(coord.admin_token, "status_code_conformance,content_type_conformance",
            "--exclude-tag-regex", "^(meta|hosts|vms|migrations)$")
        log = coord.log_path.read_text()
        assert '"unhandled error"' not in log, log[-4000:]
        assert coord.admin_token not in log and coord.agent_token not in log
