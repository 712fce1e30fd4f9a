"""Review tools on the labelled neighbours: label QA, near-duplicates, learning curves."""


def task_link(label_studio_url: str | None, project: object, task: object) -> str | None:
    """The URL that opens a task in Label Studio's Data Manager (None without a URL)."""
    if not label_studio_url:
        return None
    return f"{label_studio_url.rstrip('/')}/projects/{project}/data?task={task}"
