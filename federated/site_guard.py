"""Site-local NVFlare component: refuse every federated job whose client app this site has not pinned.

Installed by the site's IT, never shipped with a job: copy this file to the client's startup kit as
``local/custom/site_guard.py`` and add the component to ``local/resources.json`` (federated/README.md, "Site job
policy")::

    {"id": "prostate_jrs_job_guard", "path": "site_guard.JobPinGuard",
     "args": {"policy_file": "prostate_jrs_job_policy.json"}}

NVFlare builds the site's components in the job process first and fires ``BEFORE_BUILD_COMPONENT`` to them before it
builds each component of the job's config. On the first one the guard hashes the deployed client app and checks it
against the policy (:func:`prostate_jrs.federated_policy.check_app`); if it does not match, the job's build fails
with the reason in the site log, so not one class of the job is built, ``client.py`` never starts and no bundle
config is parsed.
"""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

from prostate_jrs.federated_policy import POLICY_FILE, JobNotPinnedError, PolicyError, check_app, load_policy

__all__ = ["JobPinGuard"]


class JobPinGuard(FLComponent):
    """Check each job's client app against the site policy before any of the job is built.

    Args:
        policy_file: the policy file; relative to the site's ``local/`` folder unless absolute.
    """

    def __init__(self, policy_file: str = POLICY_FILE) -> None:
        super().__init__()
        self.policy_file = policy_file
        self._accepted: set[str] = set()

    def _policy_path(self, fl_ctx: FLContext) -> Path:
        path = Path(self.policy_file)
        if path.is_absolute():
            return path
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        return Path(workspace.get_site_config_dir()) / path

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        """On ``BEFORE_BUILD_COMPONENT``: accept the job once it matches a pinned version, else fail the build."""
        if event_type != EventType.BEFORE_BUILD_COMPONENT:
            return
        job_id = str(fl_ctx.get_prop(FLContextKey.CURRENT_JOB_ID) or "")
        if job_id in self._accepted:
            return
        app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT)
        policy_path = self._policy_path(fl_ctx)
        try:
            entry = check_app(app_root, load_policy(policy_path))
        except (JobNotPinnedError, PolicyError) as err:
            reason = f"job {job_id} refused by the site job policy: {err}"
            self.log_error(fl_ctx, reason, fire_event=False)
            fl_ctx.set_prop(FLContextKey.COMPONENT_BUILD_ERROR, reason, private=True, sticky=False)
            return
        self._accepted.add(job_id)
        self.log_info(fl_ctx, f"job {job_id}: client app matches the pinned job {entry.label!r} ({policy_path})")
