"""The Celery worker image: a prebuilt reference from config, or app/ built and pushed.

Building needs a Docker daemon where `pulumi up` runs; a stack that sets
`workers.image` needs none (and the "existing" target always sets it).
"""

from __future__ import annotations

import pulumi
import pulumi_docker_build as docker_build
import pulumi_gcp as gcp

from components.config import StackConfig
from components.gcp_ids import stack_id

# Artifact Registry repository IDs: lowercase letters, digits and hyphens, at most 63.
REPOSITORY_ID_PREFIX = "celery-workers"
REPOSITORY_ID_MAX = 63


def repository_id(config: StackConfig) -> str:
    """Per stack: dev and prod may share one GCP project (and one region)."""
    return stack_id(REPOSITORY_ID_PREFIX, config.stack, REPOSITORY_ID_MAX)


def artifact_repository(
    config: StackConfig, opts: pulumi.ResourceOptions
) -> gcp.artifactregistry.Repository:
    return gcp.artifactregistry.Repository(
        "workers-images",
        project=config.gcp_project,
        location=config.gke.region,
        repository_id=repository_id(config),
        format="DOCKER",
        description="Celery worker images",
        opts=opts,
    )


def image_name(config: StackConfig) -> str:
    registry = f"{config.gke.region}-docker.pkg.dev"
    return f"{registry}/{config.gcp_project}/{repository_id(config)}/celery-worker"


def built_image(
    config: StackConfig, repository: gcp.artifactregistry.Repository
) -> docker_build.Image:
    registry = f"{config.gke.region}-docker.pkg.dev"
    token = gcp.organizations.get_client_config_output().access_token
    return docker_build.Image(
        "workers-image",
        # Relative to the project directory, where `pulumi up` runs: no machine path in the state.
        context=docker_build.BuildContextArgs(location="."),
        dockerfile=docker_build.DockerfileArgs(location="app/Dockerfile"),
        platforms=[docker_build.Platform.LINUX_AMD64],
        # Tagged per stack, consumed by digest (`ref`): a rebuild rolls the Deployment.
        tags=[f"{image_name(config)}:{config.stack}"],
        push=True,
        registries=[
            docker_build.RegistryArgs(
                address=registry,
                username="oauth2accesstoken",
                password=pulumi.Output.secret(token),
            )
        ],
        opts=pulumi.ResourceOptions(depends_on=[repository]),
    )


def worker_image(config: StackConfig) -> pulumi.Input[str]:
    """The image reference the worker Deployment and scheduler Job run."""
    if config.workers.image:
        return config.workers.image
    repository = artifact_repository(config, pulumi.ResourceOptions())
    return built_image(config, repository).ref
