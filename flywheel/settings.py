"""The base of every configuration section."""

from pydantic import BaseModel, ConfigDict


class Settings(BaseModel):
    """A section of the configuration: a key it does not know is refused, naming it, rather than ignored (a
    misspelt or retired setting would otherwise leave its default in force without a word)."""

    model_config = ConfigDict(extra="forbid")
