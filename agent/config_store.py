"""The last good xDS config on disk, so that an agent that starts while its
control plane is unreachable serves what it last knew."""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path
from types import MappingProxyType

from google.protobuf import any_pb2

from agent.xds_state import Record, XdsConfig

log = logging.getLogger("nodemesh.xds")
FORMAT = 1


class ConfigStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, config: XdsConfig) -> None:
        doc = {
            "format": FORMAT,
            "version_info": dict(config.version_info),
            "types": {t: {n: {"version": r.version,
                              "type_url": r.resource.type_url,
                              "value": base64.b64encode(r.resource.value).decode()}
                          for n, r in recs.items()}
                      for t, recs in config.types.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)  # atomic: a crash never leaves half a file

    def load(self) -> XdsConfig | None:
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')}")
            types = {}
            for t, recs in doc["types"].items():
                types[t] = MappingProxyType({
                    n: Record(n, r["version"], any_pb2.Any(type_url=r["type_url"],
                                                           value=base64.b64decode(r["value"])))
                    for n, r in recs.items()})
            return XdsConfig(MappingProxyType(types), MappingProxyType(dict(doc["version_info"])))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("ignoring the persisted config %s: unreadable (%s)", self.path, exc)
            return None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
