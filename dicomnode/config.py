"""One typed settings object: defaults, then a TOML file (``--config FILE``), then ``DICOMNODE_*``.

Nested keys use ``__`` in the environment, e.g. ``DICOMNODE_PACS__PORT=4242``.

A relative path in the file (``storage_dir``, ``model_path``, the ``[tls]`` files) is relative to the
file's folder, so a node started by systemd or cron from any folder finds what the file names (and
``~/...`` is the home folder of the user the node runs as); one in the environment stays relative to
the working directory, as every shell tool's does.

Strict by design: every section refuses unknown keys and every choice is a closed set, so a typo in
a hospital's node.toml stops the node at start-up with the key's name instead of being ignored.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import string
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from reporting.seg_types import SegTypeName
from seg.recipe import Device, Runtime

CONFIG_ENV = "DICOMNODE_CONFIG"
MIN_TOKEN_CHARS = 16  # the operations page's shared secret
MB = 1_000_000  # bytes in the MB of every *_mb setting (max_instance_mb, min_free_disk_mb): decimal, as df -H


def _case_insensitive(choices: Any) -> BeforeValidator:
    """Choices are case-insensitive (``binary`` = ``BINARY``); anything else is passed on unchanged, so
    the refusal repeats what the administrator wrote (``got 'binry'``, not ``'BINRY'``)."""
    allowed = set(get_args(choices))
    return BeforeValidator(lambda v: v.upper() if isinstance(v, str) and v.upper() in allowed else v)


_COMPRESSIONS = Literal["RLE", "JPEGLS"]
_LOG_LEVELS = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
SegType = Annotated[SegTypeName, _case_insensitive(SegTypeName)]
LabelmapCompression = Annotated[_COMPRESSIONS, _case_insensitive(_COMPRESSIONS)]
LogLevel = Annotated[_LOG_LEVELS, _case_insensitive(_LOG_LEVELS)]


def _version_text(value: Any) -> Any:
    """``min_version = 1.2`` (a TOML float) means the same as ``"1.2"``; anything else (``1.25``) is
    passed on as written, to be refused with what the administrator wrote."""
    return str(value) if isinstance(value, float) and str(value) in ("1.2", "1.3") else value


def _existing_file(value: Path) -> Path:
    """A certificate or key path in use must name a file now, so a typo stops the node at start-up, not
    at the first association (loading it happens when the node listens or connects: see
    dicomnode.network.tls)."""
    if not value.exists():
        raise ValueError(f"no such file: {value}")
    if not value.is_file():
        raise ValueError(f"not a file: {value}")
    return value


def _switch(value: Any) -> Any:
    """A strict on/off: a TOML boolean, or ``true``/``false`` (an environment variable is text); 1, "yes"
    or "on" are refused, so a typo cannot silently flip it."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


Switch = Annotated[bool, BeforeValidator(_switch)]


def _not_a_switch(what: str) -> Any:
    """A number is not ``true``/``false``: pydantic reads ``true`` as 1, so a switch written on the
    wrong key would silently set the number."""
    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"must be {what}, not true or false")
        return value
    return BeforeValidator(check)


Count = Annotated[int, _not_a_switch("a whole number")]  # every whole-number setting
Number = Annotated[float, _not_a_switch("a number")]  # every other number setting


_AE_CHARACTERS = re.compile(r"[ -\[\]-~]+")  # printable ASCII but the backslash (DICOM's AE VR)


def _ae_title(value: str) -> str:
    """An AE title as DICOM allows it (at most 16 characters, no backslash or control character, not
    only spaces; the spaces around it do not count), so a typo stops the node at start-up with the
    key's name instead of a traceback when it listens or calls."""
    text = value.strip()
    if not text:
        raise ValueError("must not be empty")
    if len(text) > 16:
        raise ValueError(f"at most 16 characters, not {len(text)}")
    if not _AE_CHARACTERS.fullmatch(text):
        raise ValueError("printable ASCII characters only, no backslash")
    return text


AETitle = Annotated[str, AfterValidator(_ae_title)]


def _title_list(value: Any) -> Any:
    """``ORTHANC,PACS2`` in an environment variable is a list of two titles (JSON lists still work):
    what an administrator writes in a unit file, instead of a JSON parse error."""
    if isinstance(value, str):
        text = value.strip()
        return json.loads(text) if text.startswith("[") else [t for t in text.split(",") if t.strip()]
    return value


AETitles = Annotated[list[AETitle], NoDecode, BeforeValidator(_title_list)]


def _host_map(value: Any) -> Any:
    """``ORTHANC=10.0.0.5;PACS2=10.0.0.6,10.0.0.7`` in an environment variable is ``calling_aet_hosts``
    (a JSON object still works): pydantic-settings wanted JSON and said only "error parsing value"."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            return json.loads(text)
        pins: dict[str, list[str]] = {}
        for item in filter(None, (part.strip() for part in text.split(";"))):
            title, sep, hosts = item.partition("=")
            if not sep:
                raise ValueError("give AE=host[,host];AE2=host (or a JSON object)")
            pins[title.strip()] = [h.strip() for h in hosts.split(",") if h.strip()]
        return pins
    return value


Port = Annotated[Count, Field(ge=1, le=65535)]
Seconds = Annotated[Number, Field(ge=0)]


def _absolute(value: Path | None) -> Path | None:
    """A path as the node will use it: ``~`` is the node user's home, a relative path is relative to
    the working directory (a file's paths are anchored at its folder before this, :func:`_anchored`).
    Why: from a ``DICOMNODE_*`` variable "~/state" made a folder named "~", and `config show` printed
    "var" for the default, which is another folder under systemd than in an admin's shell."""
    return None if value is None else Path.cwd() / value.expanduser()


NodePath = Annotated[Path, AfterValidator(_absolute)]


def _model_package(value: Path | None) -> Path | None:
    """A site's model folder must hold a model.json now: a typo would otherwise let the node receive
    every series and fail each job. The package itself (weights, checksum) is read at warm-up."""
    if value is not None and not (value / "model.json").is_file():
        raise ValueError(f"no model package at {value} (a folder with model.json and its weights)")
    return value


TlsVersion = Annotated[Literal["1.2", "1.3"], BeforeValidator(_version_text)]


class Section(BaseModel):
    """A ``[section]`` of the TOML file: unknown keys are errors (``[send] atempts = 3`` is refused)."""

    model_config = ConfigDict(extra="forbid")


def _host_name(value: str) -> str:
    """A host to call: an empty one was accepted and every send and `echo` failed on it
    ("no association with ORTHANC@:4242") instead of the check naming the key."""
    text = value.strip()
    if not text:
        raise ValueError("must not be empty: the PACS's DNS name or IP address")
    return text


class PacsSettings(Section):
    """Where results go (and where priors are queried)."""

    ae_title: AETitle = "ORTHANC"
    host: Annotated[str, AfterValidator(_host_name)] = "127.0.0.1"
    port: Port = 4242


class WorkerSettings(Section):
    enabled: Switch = True  # run the worker inside ``serve``
    device: Device = "auto"  # auto | cpu | cuda | cuda:N
    # who computes the windows: auto = OpenVINO on CPU when the [openvino] extra is installed (seg/runtime.py)
    runtime: Runtime = "auto"
    poll_seconds: Seconds = 1.0
    max_attempts: Count = Field(3, ge=1)  # processing attempts before a job is failed
    # a job whose pipeline process runs longer is killed and failed ("pipeline-timeout"); not retried
    timeout_seconds: Number = Field(1800.0, gt=0)


class SendSettings(Section):
    attempts: Count = Field(5, ge=1)
    initial_backoff_seconds: Seconds = 20.0  # doubles after each failed attempt: 20+40+80+160 s ≈ 5 min
    max_backoff_seconds: Seconds = 320.0
    timeout_seconds: Number = Field(30.0, gt=0)
    # associations open to the PACS at once: an output handed on while another is being stored goes out
    # beside it (the SR need not wait for Orthanc to store a large SEG); 1 = one send after the other
    max_associations: Count = Field(2, ge=1)


class SelectionSettings(Section):
    min_z_extent_mm: Number = Field(250.0, ge=0)
    min_slices: Count = Field(50, ge=1)
    incomplete_hold_seconds: Seconds = 300.0  # a quiet series with a gap waits this long, then "incomplete"


class OutputSettings(Section):
    # FRACTIONAL (RLE): what OHIF 3.x shows correctly at any frame size | BINARY | LABELMAP (smallest)
    # trade-offs: docs/conformance.md, "SEG encoding"
    seg_type: SegType = "FRACTIONAL"
    labelmap_compression: LabelmapCompression = "RLE"  # RLE | JPEGLS, used for LABELMAP
    summary: Switch = True
    followup_sr: Switch = True


class PairingSettings(Section):
    enabled: Switch = True
    retrieve_priors: Switch = True  # C-FIND/C-MOVE a missing baseline from the PACS
    # a pre-operative CT at most this many days before the surgery day is the admission CT (the
    # baseline, fetched first); an older baseline is flagged (dicomnode/clinical/admission.py). The
    # registry has no admission day: a site with longer delays to surgery sets more; at most a year
    admission_window_days: Count = Field(14, ge=1, le=365)


class TlsSettings(Section):
    """DICOM TLS (the secure transport connection profile) for the listener and for associations to the PACS.

    One switch for both directions, as in Orthanc: the PACS that routes to a TLS listener is the PACS the
    node sends to. The node presents ``certificate`` as server and as client, and trusts only peers whose
    certificates ``ca_certificates`` signs (never the system's web CAs).
    """

    enabled: Switch = False
    # PEM files (validate_default: one left out is named with the others, not after they are fixed):
    # this node's certificate then any intermediate CAs; its key, unencrypted, readable by the node's
    # user only; the bundle of the CAs that sign the peers' certificates
    certificate: NodePath | None = Field(None, validate_default=True)
    private_key: NodePath | None = Field(None, validate_default=True)
    ca_certificates: NodePath | None = Field(None, validate_default=True)
    require_client_certificate: Switch = False  # listener: refuse callers without one (else verified if sent)
    check_hostname: Switch = True  # to the PACS: its certificate must name [pacs] host (DNS name or IP)
    min_version: TlsVersion = "1.2"  # "1.2" | "1.3"

    @field_validator("certificate", "private_key", "ca_certificates")
    @classmethod
    def _exists_when_enabled(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        """When TLS is on (``enabled`` is declared first, so it is known here) each file must be given
        and exist: TLS without a certificate, key or CA cannot work, so say so now, each by name."""
        if not info.data.get("enabled"):
            return value
        if value is None:
            raise ValueError("enabled = true needs it (a PEM file path)")
        return _existing_file(value)


def loopback_host(host: str) -> bool:
    """Only this machine can connect: ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


VIEWER_FIELDS = ("study_uid", "series_uid")


def _viewer_template(value: str) -> str:
    """A link template such as ``http://pacs:8042/ohif/viewer?StudyInstanceUIDs={study_uid}``: checked
    here so a typo in a placeholder fails at start-up rather than as a broken link on every row."""
    if not re.match(r"https?://", value):
        raise ValueError("must start with http:// or https://")
    names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
    unknown = sorted(names - set(VIEWER_FIELDS))
    if unknown:
        raise ValueError(f"unknown placeholder {{{unknown[0]}}}: use {{study_uid}} and/or {{series_uid}}")
    if not names:
        raise ValueError("needs {study_uid} (or {series_uid}) where the viewer expects the UID")
    return value


class OpsSettings(Section):
    """The read-only operations page and Prometheus ``/metrics`` (dicomnode/ops/page.py).

    Off by default and on the loopback interface: it shows job states, reasons and disk use (patients
    only by pseudonym). Listening on any other address needs ``token`` (sent as ``Authorization:
    Bearer <token>``, or as the password of HTTP Basic), and with a token set every request needs it.
    """

    enabled: Switch = False
    host: str = "127.0.0.1"
    port: Port = 8089
    # a shared secret of MIN_TOKEN_CHARS characters or more; e.g. `openssl rand -hex 24`
    token: SecretStr | None = None
    # link from each job to its study, e.g. Orthanc's OHIF plugin
    # "http://pacs:8042/ohif/viewer?StudyInstanceUIDs={study_uid}"; None = no links
    viewer_url: Annotated[str, AfterValidator(_viewer_template)] | None = None

    @field_validator("token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        """A short secret is guessed; refused here, so `config check` says what `serve` would."""
        if token is not None and len(token.get_secret_value()) < MIN_TOKEN_CHARS:
            raise ValueError(f"must be {MIN_TOKEN_CHARS} characters or more (e.g. `openssl rand -hex 24`)")
        return token

    @model_validator(mode="after")
    def _token_off_loopback(self) -> OpsSettings:
        """Refuse, rather than warn, a page reachable from the network without a secret."""
        if self.enabled and self.token is None and not loopback_host(self.host):
            raise ValueError(f"host = {self.host!r} is reachable from other machines: set ops.token "
                             "(16 characters or more) or bind 127.0.0.1")
        return self


class Settings(BaseSettings):
    """Effective configuration of a node."""

    model_config = SettingsConfigDict(
        env_prefix="DICOMNODE_", env_nested_delimiter="__", extra="forbid"
    )

    ae_title: AETitle = "THIGHNODE"
    host: str = "0.0.0.0"
    port: Port = 11112
    storage_dir: NodePath = Field(Path("var"), validate_default=True)
    allowed_calling_aets: AETitles = Field(default_factory=list)  # empty = accept all
    stable_seconds: Seconds = 10.0
    # true = a series is complete as soon as the association that delivered it is released normally
    # (A-RELEASE), unless another open association is still delivering it; an abort or a dropped
    # connection waits stable_seconds as before, and so does a series whose release is followed by a
    # new instance. Only with receive_processes = 1 (dicomnode/storage/series.py, StabilityWatcher)
    series_complete_on_release: Switch = False
    # associations at a time; counted from an accepted A-ASSOCIATE-RQ
    max_associations: Count = Field(8, ge=1)
    # connections whose A-ASSOCIATE-RQ has not arrived yet (at most 4 of them per source address): when
    # full, the oldest is closed, so half-sent requests cannot keep callers out of max_associations
    max_pending_connections: Count = Field(32, ge=1)
    # each calling AE title listed here is accepted only from these addresses or networks
    # ("10.0.0.5", "10.0.0.0/24"), like Orthanc's DicomCheckModalityHost; unlisted titles are not pinned
    calling_aet_hosts: Annotated[dict[AETitle, list[str]], NoDecode, BeforeValidator(_host_map)] = Field(
        default_factory=dict)
    acse_timeout_seconds: Number = Field(10.0, gt=0)  # ARTIM: the whole association request, from connect
    network_timeout_seconds: Number = Field(30.0, gt=0)  # an idle association or a stalled PDU is dropped
    # larger C-STORE data sets are refused (0xA700); × max_associations bounds what callers buffer
    max_instance_mb: Number = Field(256.0, gt=0)
    # disk back-pressure: below min_free_disk_mb free (MB available to the node's user) or above
    # max_disk_used_pct used on the storage_dir volume, new associations get a transient reject
    # (temporary congestion) and C-STOREs 0xA700, until space returns; 0 and 100 switch each off
    min_free_disk_mb: Number = Field(2048.0, ge=0)
    max_disk_used_pct: Number = Field(90.0, gt=0, le=100)
    # pynetdicom throughput patches (dicomnode/network/pynetdicom_tuning.py; applied only to the pynetdicom
    # versions they were checked against); false = plain pynetdicom. The security bounds stay on either way
    pynetdicom_tuning: Switch = True
    # processes that serve associations (dicomnode/network/receive_pool.py): 1 = the listener's own threads;
    # N > 1 = N worker processes fed by one accepting parent, which keeps the node-wide limits
    receive_processes: Count = Field(1, ge=1, le=64)
    # how a received instance is made durable before its success status (dicomnode/storage/store.py):
    # "syncfs" = rename, then one syncfs (Linux >= 5.8; one disk flush per instance, but it also flushes
    # other writers' dirty data on that filesystem, so one C-STORE may wait for them); "fsync" = fsync,
    # rename, fsync the folder (two flushes, only our own data); "auto" = syncfs where the kernel has it
    receive_flush: Literal["auto", "syncfs", "fsync"] = "auto"
    # None = the shipped phantom-trained demo model
    model_path: Annotated[NodePath | None, AfterValidator(_model_package)] = None
    log_level: LogLevel = "INFO"
    log_json: Switch = False
    pacs: PacsSettings = Field(default_factory=PacsSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    send: SendSettings = Field(default_factory=SendSettings)
    selection: SelectionSettings = Field(default_factory=SelectionSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    pairing: PairingSettings = Field(default_factory=PairingSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    ops: OpsSettings = Field(default_factory=OpsSettings)
    # delete received instances this many days after every result of their series was sent; None = keep
    retention_days: Number | None = Field(None, gt=0)

    # where values come from, beside explicit ones: set on the throw-away subclass of :func:`_bound`
    file_values: ClassVar[dict[str, Any] | None] = None  # a TOML file's, its relative paths anchored
    read_environment: ClassVar[bool] = True  # DICOMNODE_* variables (above the file)

    @model_validator(mode="after")
    def _release_needs_one_process(self) -> Settings:
        """Refuse what is not built: the receive processes do not report releases to the watcher."""
        if self.series_complete_on_release and self.receive_processes > 1:
            raise ValueError("series_complete_on_release works only with receive_processes = 1 "
                             f"(got {self.receive_processes}): set one of them back")
        return self

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
        """Explicit values, then the environment (unless a check reads the file alone), then the file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings]
        if cls.read_environment:
            sources.append(env_settings)
        if cls.file_values is not None:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=cls.file_values))
        return tuple(sources)

    @property
    def db_path(self) -> Path:
        return self.storage_dir / "index.sqlite"


class ConfigError(ValueError):
    """A configuration that does not validate; the message names each bad key and what it accepts."""


def _section_of(model: type[BaseModel], key: Any) -> type[BaseModel] | None:
    """The section model behind ``key`` of ``model`` (``"send"`` → SendSettings), or None."""
    field = model.model_fields.get(str(key))
    annotation = field.annotation if field is not None else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that holds the key at ``loc`` (``("send", "atempts")`` → SendSettings)."""
    model: type[BaseModel] | None = Settings
    for part in loc[:-1]:
        model = _section_of(model, part) if model is not None else None
    return model


def _is_path(annotation: Any) -> bool:
    """A setting that holds a path (``Path``, ``Path | None``, an annotated Path)."""
    return annotation is Path or any(_is_path(arg) for arg in get_args(annotation))


def _anchored(values: dict[str, Any], folder: Path, model: type[BaseModel] = Settings) -> dict[str, Any]:
    """A file's values with each relative path setting made relative to ``folder`` (the file's), not
    to the working directory, which is another one under systemd or cron. Unknown keys are left for
    validation to refuse."""
    out = dict(values)
    for key, value in values.items():
        field = model.model_fields.get(key)
        section = _section_of(model, key)
        if section is not None and isinstance(value, dict):
            out[key] = _anchored(value, folder, section)
        elif field is not None and isinstance(value, str) and value and _is_path(field.annotation):
            # an absolute value stays as it is; "~/..." is the service user's home, as in a shell
            out[key] = str(folder / Path(value).expanduser())
    return out


SECRET_KEYS = frozenset({"token"})


def _shown(loc: tuple[Any, ...], value: Any) -> str:
    """A bad input as an error message may repeat it: secrets (``ops.token``) masked."""
    if loc and str(loc[-1]) in SECRET_KEYS:
        return "'***'"
    if isinstance(value, dict):
        return repr({k: "***" if k in SECRET_KEYS else v for k, v in value.items()})
    return repr(value)


def describe_errors(exc: ValidationError) -> list[str]:
    """One line per problem: the dotted key, then what is wrong (for an unknown key, the known ones)."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            model = _section_model(err["loc"])
            known = ", ".join(model.model_fields) if model is not None else "?"
            lines.append(f"{key}: unknown key (allowed here: {known})")
        elif err["type"] == "literal_error":
            lines.append(f"{key}: must be {err['ctx']['expected']} (got {err['input']!r})")
        else:
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {message} (got {_shown(err['loc'], err['input'])})")
    return lines


def _validated(build: Any, source: str) -> Settings:
    """``build()``, with pydantic's error turned into a ConfigError that lists every bad key."""
    try:
        return build()
    except ValidationError as exc:
        problems = "\n  ".join(describe_errors(exc))
        raise ConfigError(f"invalid configuration ({source}):\n  {problems}") from exc


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's TOML table; FileNotFoundError or a ConfigError that names the file."""
    try:
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except PermissionError as exc:  # node.toml may hold ops.token: root:dicomnode 0640 (pacs-admin §2)
        raise ConfigError(f"cannot read {path}: permission denied (run as the node's user, or as a "
                          "member of its group)") from exc


def _file_values(path: Path) -> dict[str, Any]:
    """The file's values, its relative paths anchored at its folder (as named: a link to the file
    is not followed, so paths stay beside the node.toml the administrator edits)."""
    return _anchored(_read_toml(path), path.absolute().parent)


def _bound(file_values: dict[str, Any] | None, environment: bool) -> type[Settings]:
    """A throw-away subclass of Settings bound to one file's values (and, or not, the environment),
    so one caller's file never leaks into another's settings or the process environment."""

    class FileSettings(Settings):
        pass

    FileSettings.file_values, FileSettings.read_environment = file_values, environment
    return FileSettings


# DICOMNODE_* variables that are not settings: the file to read, and knobs of one module each
# (the pipeline to run, the CPU precision of inference, the OHIF build the viewer tests serve).
OTHER_VARIABLES = frozenset({CONFIG_ENV, "DICOMNODE_PIPELINE", "DICOMNODE_CPU_PRECISION",
                             "DICOMNODE_OHIF_DIST"})


def environment_problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per ``DICOMNODE_*`` variable that names no setting, the variable named as set.

    Why: pydantic-settings reads only the names it knows, so ``DICOMNODE_PROT=104`` or
    ``DICOMNODE_PACS_HOST=pacs`` (one underscore) left the node on its old port or PACS without a
    word, and a section's unknown key was reported as ``pacs.hots``, which no file holds."""
    from seg.recipe import cpu_precision

    environ = os.environ if environ is None else environ
    prefix = Settings.model_config["env_prefix"]
    problems = []
    try:
        cpu_precision(environ)
    except ValueError as exc:
        problems.append(str(exc))
    for name in sorted(environ):
        if not name.upper().startswith(prefix) or name.upper() in OTHER_VARIABLES:
            continue
        key, _, rest = name[len(prefix):].lower().partition("__")
        section = _section_of(Settings, key)
        known_key = not rest or section is not None and rest in section.model_fields
        if key in Settings.model_fields and known_key:
            continue
        if key in Settings.model_fields and section is not None:
            problems.append(f"{name}: {key} has no key {rest!r} (allowed: {', '.join(section.model_fields)})")
            continue
        head, _, tail = key.partition("_")  # a section and its key joined by one "_"
        hint = ""
        if tail and _section_of(Settings, head) is not None:
            hint = f"; did you mean {prefix}{head.upper()}__{tail.upper()}?"
        problems.append(f"{name}: no such setting{hint} (settings: {', '.join(Settings.model_fields)}; "
                        f"a section's key as {prefix}SECTION__KEY)")
    return problems


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from defaults < TOML file < environment < explicit overrides.

    The file is ``config_file`` or else ``$DICOMNODE_CONFIG``. A ``DICOMNODE_*`` variable that names
    no setting is refused (:func:`environment_problems`).
    """
    if problems := environment_problems():
        raise ConfigError("invalid configuration (DICOMNODE_* variables):\n  " + "\n  ".join(problems))
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = Path(os.environ[CONFIG_ENV])
    if config_file is None:
        return _validated(lambda: Settings(**overrides), "defaults and DICOMNODE_* variables")
    path = Path(config_file)
    values = _file_values(path)  # fails early and clearly on a missing or malformed file
    return _validated(lambda: _bound(values, True)(**overrides), f"{path} and DICOMNODE_* variables")


def check_file(config_file: Path) -> Settings:
    """Validate one TOML file on its own (no DICOMNODE_* variables): the settings, or ConfigError."""
    path = Path(config_file)
    values = _file_values(path)
    return _validated(lambda: _bound(values, False)(), str(path))
