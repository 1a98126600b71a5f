"""The GitHub workflows, checked as a maintainer would before they ever run: valid against the Actions schema,
no zizmor finding (offline, auditor persona), every action pinned by commit, the preview's safety rules in place,
and one install script shared with .ci/run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.pulumi_harness import PROJECT_DIR

WORKFLOWS = sorted((PROJECT_DIR / ".github" / "workflows").glob("*.yml"))
BIN = Path(sys.executable).parent


def load(name: str) -> dict:
    document = yaml.safe_load((PROJECT_DIR / ".github" / "workflows" / name).read_text())
    document["on"] = document.pop(True, document.get("on"))  # YAML 1.1 reads the key `on` as a boolean
    return document


def test_workflows_match_the_github_actions_schema() -> None:
    assert [w.name for w in WORKFLOWS] == ["preview.yml", "test.yml", "up.yml"]
    result = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_finds_nothing() -> None:
    result = subprocess.run(
        [BIN / "zizmor", "--offline", "--persona=auditor", "--no-progress", str(PROJECT_DIR / ".github")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings to report" in result.stdout + result.stderr


def test_every_action_is_pinned_by_commit_with_its_version() -> None:
    uses = [line.strip() for w in WORKFLOWS for line in w.read_text().splitlines() if "uses:" in line]
    assert uses
    for line in uses:
        assert re.fullmatch(r"- uses: [\w.-]+/[\w.-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+", line), line


def test_the_test_job_installs_what_ci_run_installs() -> None:
    steps = load("test.yml")["jobs"]["test"]["steps"]
    assert steps[-1]["run"] == "sudo env CI=true bash .ci/run"
    ci_run = (PROJECT_DIR / ".ci" / "run").read_text()
    assert "bash .ci/install" in ci_run and "make test" in ci_run and "apt-get" not in ci_run


def test_the_preview_is_safe_for_pull_requests() -> None:
    preview = load("preview.yml")
    assert preview["on"] == {"pull_request": None}  # never pull_request_target: a fork's code never gets secrets
    assert preview["permissions"] == {}
    job = preview["jobs"]["preview"]
    assert job["if"] == "github.event.pull_request.head.repo.full_name == github.repository"
    assert job["environment"] == "preview"  # required reviewers before a contributor's code runs with credentials
    assert job["permissions"] == {"contents": "read", "pull-requests": "write"}
    [pulumi] = [s for s in job["steps"] if s.get("uses", "").startswith("pulumi/actions@")]
    required = re.search(r'requiredPulumiVersion: "?>=([\d.]+)', (PROJECT_DIR / "Pulumi.yaml").read_text())
    assert pulumi["with"]["pulumi-version"] == required.group(1)
    assert pulumi["with"]["stack-name"] == "${{ vars.PULUMI_STACK }}"
    assert pulumi["with"]["policyPacks"] == "policy"
    assert pulumi["with"]["comment-on-pr"] is True and pulumi["with"]["edit-pr-comment"] is True
    assert pulumi["env"]["HCLOUD_TOKEN"] == "${{ secrets.HCLOUD_TOKEN_READONLY }}"
    fork = preview["jobs"]["fork-notice"]
    assert fork["if"] == "github.event.pull_request.head.repo.full_name != github.repository"
    assert "::notice" in fork["steps"][0]["run"] and "secrets" not in yaml.safe_dump(fork)


@pytest.mark.parametrize("checkout_in", ["preview.yml", "test.yml", "up.yml"])
def test_checkout_never_persists_credentials(checkout_in: str) -> None:
    checkouts = [
        step
        for job in load(checkout_in)["jobs"].values()
        for step in job["steps"]
        if step.get("uses", "").startswith("actions/checkout@")
    ]
    assert checkouts, f"{checkout_in} checks nothing out: this test would prove nothing"
    for step in checkouts:
        assert step["with"]["persist-credentials"] is False


def test_up_is_opt_in_and_protected() -> None:
    up = load("up.yml")
    job = up["jobs"]["up"]
    assert job["if"] == "vars.PULUMI_AUTO_UP == 'true'" and job["environment"] == "production"
    assert up["concurrency"]["cancel-in-progress"] is False  # an update is never cut off half-way
