"""Review tools on the labelled neighbours: label QA, near-duplicates, learning curves."""

from urllib.parse import quote

from echolabel.settings import Settings


def task_link(label_studio_url: str | None, project: object, task: object) -> str | None:
    """The URL that opens a task in Label Studio's Data Manager (None without a URL)."""
    if not label_studio_url:
        return None
    return (
        f"{label_studio_url.rstrip('/')}/projects/{quote(str(project), safe='')}/data"
        f"?task={quote(str(task), safe='')}"
    )


def browser_label_studio_url(settings: Settings) -> str | None:
    """Label Studio as a browser reaches it (its public URL where that differs, e.g. compose)."""
    return settings.label_studio_public_url or settings.label_studio_url
