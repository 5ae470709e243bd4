"""SGLang 0.5.23's own contract, loaded from the installed wheel by file path (importing the ``sglang``
package pulls CUDA-only code): the generated request/response schema (``api/v1/api_types.py``) and
the request authorisation (``srt/utils/auth.py`` with each endpoint's level as marked in
``srt/entrypoints/http_server.py``). The protocol server and the client tests check against these.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType


def load_api_types() -> ModuleType | None:
    """SGLang's generated request/response contract, by file path (importing sglang pulls CUDA code)."""
    spec = importlib.util.find_spec("sglang")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        path = Path(root) / "api" / "v1" / "api_types.py"
        if path.is_file():
            module_spec = importlib.util.spec_from_file_location("sglang_api_v1_types", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module  # msgspec resolves the string annotations through it
            module_spec.loader.exec_module(module)
            return module
    return None


def _sglang_root() -> Path | None:
    spec = importlib.util.find_spec("sglang")
    for root in list(spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / "srt" / "utils" / "auth.py").is_file():
            return Path(root)
    return None


class SGLangAuth:
    """SGLang 0.5.23's request authorisation: its own ``decide_request_auth`` and endpoint levels."""

    def __init__(self, api_key: str | None, admin_api_key: str | None) -> None:
        root = _sglang_root()
        if root is None:
            raise RuntimeError("keys need the sglang wheel (srt/utils/auth.py): pip install --no-deps sglang==0.5.23")
        spec = importlib.util.spec_from_file_location("sglang_srt_utils_auth", root / "srt" / "utils" / "auth.py")
        self.module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = self.module  # dataclasses resolve the module's annotations through it
        spec.loader.exec_module(self.module)
        self.levels = endpoint_auth_levels(root)
        self.api_key, self.admin_api_key = api_key, admin_api_key

    def decide(self, method: str, path: str, authorization: str | None) -> int | None:
        """None when allowed, else the HTTP status SGLang answers (401 or 403)."""
        level = self.module.AuthLevel(self.levels.get(path, "normal"))
        decision = self.module.decide_request_auth(method=method, path=path, authorization_header=authorization,
                                                   api_key=self.api_key, admin_api_key=self.admin_api_key,
                                                   auth_level=level)
        return None if decision.allowed else decision.error_status_code


def endpoint_auth_levels(root: Path | None = None) -> dict[str, str]:
    """{path: level} for every route of SGLang's http_server.py marked with ``@auth_level``."""
    root = root or _sglang_root()
    text = (root / "srt" / "entrypoints" / "http_server.py").read_text()
    pattern = re.compile(r'@app\.(?:api_route|post|get|put|delete)\("([^"]+)"[^\n]*\)\s*\n\s*@auth_level\(AuthLevel\.(\w+)\)')
    return {path: level.lower() for path, level in pattern.findall(text)}
