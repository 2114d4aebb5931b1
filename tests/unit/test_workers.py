"""The Celery workers component: each builder on its own, then as every stack registers it."""

from __future__ import annotations

import dataclasses

from app.settings import WorkerSettings, celery_config
from components import workers
from components.config import load_stack_config
from components.names import AMQP_CLIENT_LABEL, BROKER_URLS_KEY
from tools.mockrun import ProgramRun, is_secret, reveal, run_program, stack_config

DEPLOYMENT = "kubernetes:apps/v1:Deployment"


def _config(stack: str) -> workers.CeleryWorkersArgs:
    return workers.CeleryWorkersArgs.from_stack(load_stack_config(stack_config(stack), stack))


def test_deployment_takes_its_shape_from_config() -> None:
    config = _config("prod")
    manifest = workers.deployment(config, "example/celery:1.0")
    spec = manifest["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    # KEDA owns the count: a fixed one here would be reset by every `pulumi up`.
    assert config.autoscaled and "replicas" not in spec
    fixed = workers.deployment(dataclasses.replace(config, autoscaled=False), "img:1")
    assert fixed["spec"]["replicas"] == config.workers.replicas
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CELERY_POOL"] == config.workers.pool
    assert env["CELERY_CONCURRENCY"] == str(config.workers.concurrency)
    # One source: the flags would override what app.settings derives from the pool.
    assert not [a for a in container["command"] if a.startswith(("--pool", "--concurrency"))]
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "512Mi"}
    assert pod["terminationGracePeriodSeconds"] >= config.workers.longest_task_seconds
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_broker_credentials_come_from_a_secret_never_the_manifest() -> None:
    manifest = workers.deployment(_config("dev"), "example/celery:1.0")
    env = manifest["spec"]["template"]["spec"]["containers"][0]["env"]
    broker = [e for e in env if e["name"] == "CELERY_BROKER_URLS"]
    assert broker == [
        {
            "name": "CELERY_BROKER_URLS",
            "valueFrom": {"secretKeyRef": {"name": workers.BROKER_SECRET, "key": BROKER_URLS_KEY}},
        }
    ]
    assert "amqp://" not in repr(manifest)


def test_workers_run_non_root_and_spread_across_nodes() -> None:
    pod = workers.deployment(_config("dev"), "img:1")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    container = pod["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }
    assert pod["automountServiceAccountToken"] is False


def test_liveness_does_not_depend_on_the_broker() -> None:
    container = workers.deployment(_config("dev"), "img:1")["spec"]["template"]["spec"][
        "containers"
    ][0]
    for probe in ("livenessProbe", "readinessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:3] == ["python", "-m", "app.liveness"]
        assert "inspect" not in command and "ping" not in command


def test_grace_period_follows_the_longest_task() -> None:
    base = stack_config("dev")
    base["celery-cluster:workers"] = {**base["celery-cluster:workers"], "longestTaskSeconds": 300}
    config = workers.CeleryWorkersArgs.from_stack(load_stack_config(base, "dev"))
    pod = workers.deployment(config, "img:1")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 330


def test_scheduler_job_runs_once_is_awaited_and_bounded() -> None:
    job = workers.scheduler_job(_config("dev"), "img:1")
    assert job["spec"]["backoffLimit"] == 0
    # Awaited by Pulumi: a failed run fails `pulumi up` instead of going unseen.
    assert "pulumi.com/skipAwait" not in job["metadata"].get("annotations", {})
    assert 0 < job["spec"]["activeDeadlineSeconds"] <= 3600
    # A TTL would delete the finished Job; the next `pulumi up` would run it again.
    assert "ttlSecondsAfterFinished" not in job["spec"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["python", "-m", "app.scheduler"]
    assert "--tasks=10000" in container["command"]
    # Pipelined publishing (app.pipeline), as the stack config says.
    assert "--window=256" in container["command"]
    assert job["spec"]["template"]["metadata"]["labels"][AMQP_CLIENT_LABEL] == "true"
    options = workers.scheduler_options(_config("dev"))
    assert options.ignore_changes == ["spec"]
    assert options.custom_timeouts is not None
    minutes = int(str(options.custom_timeouts.create).rstrip("m"))
    assert minutes * 60 > job["spec"]["activeDeadlineSeconds"]


def test_a_new_image_never_reruns_the_scheduler_but_a_new_run_id_does() -> None:
    """The Job's identity is its own settings: an image digest does not change it."""
    args = _config("dev")
    first = workers.scheduler_job(args, "img@sha256:" + "a" * 64)
    rebuilt = workers.scheduler_job(args, "img@sha256:" + "b" * 64)
    assert first["metadata"]["name"] == rebuilt["metadata"]["name"]
    scheduler = args.workers.scheduler
    for change in ({"run_id": "2"}, {"tasks": scheduler.tasks + 1}, {"task_seconds": 0.5}):
        changed = dataclasses.replace(
            args,
            workers=dataclasses.replace(
                args.workers, scheduler=dataclasses.replace(scheduler, **change)
            ),
        )
        assert (
            workers.scheduler_job(changed, "img:1")["metadata"]["name"] != first["metadata"]["name"]
        ), change


def test_the_scheduler_waits_for_every_rabbitmq_pod_and_the_workers() -> None:
    config = stack_config("dev")
    run = run_program(config, "dev")
    assert run.error is None, run.error
    (job,) = run.of_type("kubernetes:batch/v1:Job")
    statefulset = run.one("kubernetes:apps/v1:StatefulSet")
    deployment = run.one(DEPLOYMENT)
    assert {statefulset.urn, deployment.urn} <= set(job.dependencies)
    assert job.ignore_changes == ["spec"]


def test_a_bad_run_id_is_refused_before_anything_is_created() -> None:
    config = stack_config("dev")
    config["celery-cluster:workers"] = {
        **config["celery-cluster:workers"],
        "scheduler": {"enabled": True, "runId": "two words"},
    }
    run = run_program(config, "dev")
    assert run.error is not None
    assert "celery-cluster:workers.scheduler.runId" in str(run.error)
    assert "'two words'" in str(run.error)
    assert not [r for r in run.resources if r.custom]


def test_every_stack_registers_workers_with_a_pdb_and_a_pinned_image(stack_run: ProgramRun) -> None:
    deployment = reveal(stack_run.one(DEPLOYMENT, "workers-deployment").inputs)
    pod = deployment["spec"]["template"]["spec"]
    image = pod["containers"][0]["image"]
    assert "@sha256:" in image or (
        ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")
    )
    assert pod["containers"][0]["resources"]["requests"]
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert deployment["spec"]["template"]["metadata"]["labels"][AMQP_CLIENT_LABEL] == "true"
    pdbs = [m for _, m in stack_run.kubernetes_objects() if m["kind"] == "PodDisruptionBudget"]
    worker_pdbs = [p for p in pdbs if p["metadata"]["namespace"] == "workers"]
    assert len(worker_pdbs) == 1
    assert worker_pdbs[0]["spec"]["maxUnavailable"] == 1


def test_the_broker_secret_is_secret_marked(stack_run: ProgramRun) -> None:
    secret = stack_run.one("kubernetes:core/v1:Secret", "workers-broker").inputs
    assert is_secret(secret["stringData"])
    urls = reveal(secret["stringData"])[BROKER_URLS_KEY].split(",")
    assert len(urls) >= 1 and all(u.startswith("amqp://") for u in urls)


def test_scheduler_job_is_toggled_by_config(stack_runs: dict[str, ProgramRun]) -> None:
    for name, run in stack_runs.items():
        jobs = run.of_type("kubernetes:batch/v1:Job")
        assert len(jobs) == int(_config(name).workers.scheduler.enabled), name
    config = stack_config("prod")
    config["celery-cluster:workers"] = {
        **config["celery-cluster:workers"],
        "scheduler": {"enabled": True, "tasks": 50, "taskSeconds": 0.1},
    }
    run = run_program(config, "prod")
    assert run.error is None
    job = reveal(run.one("kubernetes:batch/v1:Job").inputs)
    assert "--tasks=50" in job["spec"]["template"]["spec"]["containers"][0]["command"]


def test_an_image_is_built_and_pushed_unless_one_is_given() -> None:
    built = run_program(stack_config("dev"), "dev")
    assert built.error is None
    assert len(built.of_type("gcp:artifactregistry/repository:Repository")) == 1
    image = built.one("docker-build:index:Image").inputs
    assert image["push"] is True
    assert all(not tag.endswith(":latest") for tag in image["tags"])

    config = stack_config("dev")
    config["celery-cluster:workers"] = {
        **config["celery-cluster:workers"],
        "image": "example/celery:1.0",
    }
    prebuilt = run_program(config, "dev")
    assert prebuilt.error is None
    assert not prebuilt.of_type("docker-build:index:Image")
    deployment = reveal(prebuilt.one(DEPLOYMENT, "workers-deployment").inputs)
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "example/celery:1.0"


def test_the_app_accepts_the_environment_the_deployment_gives_it() -> None:
    """The manifest's env, fed to the real app.settings, yields the configured pool."""
    for stack in ("dev", "prod"):
        config = _config(stack)
        container = workers.deployment(config, "img:1")["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        env["CELERY_BROKER_URLS"] = "amqp://u:p@rabbitmq-server-0:5672/celery"
        env["HOSTNAME"] = "celery-worker-abc"
        celery = celery_config(WorkerSettings.from_env(env))
        assert celery["worker_pool"] == config.workers.pool
        assert celery["worker_concurrency"] == config.workers.concurrency
        assert celery["task_acks_late"] is True


def test_workers_skip_mingle_and_gossip() -> None:
    """Found on the pod twin: after a broker pod was SIGKILLed, mingle's neighbour sync
    held the reconnected consumer ~22 s; neither is needed to consume tasks."""
    command = workers.worker_command()
    assert "--without-mingle" in command and "--without-gossip" in command
