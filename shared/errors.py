"""User-facing errors: the CLI prints their message as one line per problem, never a traceback."""


class DentfedError(Exception):
    """A mistake in the user's input (config, manifest, image, weights file)."""


class ConfigError(DentfedError):
    """The YAML config is missing, malformed or fails validation."""


class ManifestError(DentfedError):
    """The manifest or an image it names is invalid. `problems` holds one line per problem."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        text = "\n".join(shown) + (f"\n... and {more} more problems" if more > 0 else "")
        super().__init__(text)


class WeightsError(DentfedError):
    """A pretrained weights file is missing, corrupt or does not fit the model."""
