"""One typed settings object: defaults, then a TOML file (``--config FILE``), then ``DICOMNODE_*``.

Nested keys use ``__`` in the environment, e.g. ``DICOMNODE_PACS__PORT=4242``.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "DICOMNODE_CONFIG"


class PacsSettings(BaseModel):
    """Where results go (and where priors are queried)."""

    ae_title: str = "ORTHANC"
    host: str = "127.0.0.1"
    port: int = 4242


class WorkerSettings(BaseModel):
    enabled: bool = True  # run the worker inside ``serve``
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    poll_seconds: float = 1.0
    max_attempts: int = 3  # processing attempts before a job is failed


class SendSettings(BaseModel):
    attempts: int = 5
    initial_backoff_seconds: float = 20.0  # doubles each retry: 20+40+80+160+320 s ≈ 10 min
    max_backoff_seconds: float = 320.0
    timeout_seconds: float = 30.0


class SelectionSettings(BaseModel):
    min_z_extent_mm: float = 250.0
    min_slices: int = 50
    incomplete_hold_seconds: float = 300.0  # a quiet series with a gap waits this long, then "incomplete"


class OutputSettings(BaseModel):
    seg_type: str = "BINARY"  # BINARY (every viewer) | LABELMAP
    labelmap_compression: str = "RLE"  # RLE | JPEGLS, used for LABELMAP
    summary: bool = True
    followup_sr: bool = True


class PairingSettings(BaseModel):
    enabled: bool = True
    retrieve_priors: bool = True  # C-FIND/C-MOVE a missing baseline from the PACS


class Settings(BaseSettings):
    """Effective configuration of a node."""

    model_config = SettingsConfigDict(
        env_prefix="DICOMNODE_", env_nested_delimiter="__", extra="forbid"
    )

    ae_title: str = "THIGHNODE"
    host: str = "0.0.0.0"
    port: int = 11112
    storage_dir: Path = Path("var")
    allowed_calling_aets: list[str] = Field(default_factory=list)  # empty = accept all
    stable_seconds: float = 10.0
    max_associations: int = 8
    # each calling AE title listed here is accepted only from these addresses or networks
    # ("10.0.0.5", "10.0.0.0/24"), like Orthanc's DicomCheckModalityHost; unlisted titles are not pinned
    calling_aet_hosts: dict[str, list[str]] = Field(default_factory=dict)
    acse_timeout_seconds: float = Field(10.0, gt=0)  # ARTIM: the whole association request, from connect
    network_timeout_seconds: float = Field(30.0, gt=0)  # an idle association or a stalled PDU is dropped
    max_instance_mb: float = Field(1024.0, gt=0)  # larger C-STORE data sets are refused (0xA700)
    model_path: Path | None = None  # None = the shipped phantom-trained demo model
    log_level: str = "INFO"
    log_json: bool = False
    pacs: PacsSettings = Field(default_factory=PacsSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    send: SendSettings = Field(default_factory=SendSettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    pairing: PairingSettings = Field(default_factory=PairingSettings)

    @field_validator("calling_aet_hosts")
    @classmethod
    def _hosts_are_addresses(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        """Fail at start-up on a host that is not an IP address or network (no DNS at association)."""
        for aet, hosts in value.items():
            if not hosts:
                raise ValueError(f"calling_aet_hosts.{aet}: empty list (omit the title to leave it unpinned)")
            for host in hosts:
                ipaddress.ip_network(host, strict=False)
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)

    @property
    def db_path(self) -> Path:
        return self.storage_dir / "index.sqlite"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from defaults < TOML file < environment < explicit overrides.

    The file is ``config_file`` or else ``$DICOMNODE_CONFIG``. It is bound to the returned object
    only (a throw-away subclass), never to the process environment, so one caller's file cannot leak
    into another's settings.
    """
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = Path(os.environ[CONFIG_ENV])
    if config_file is None:
        return Settings(**overrides)
    path = Path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with path.open("rb") as fh:
        tomllib.load(fh)  # fail early and clearly on a malformed file

    class FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=path.resolve())

    return FileSettings(**overrides)
