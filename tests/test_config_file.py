"""The controller's config file re-read (controller/serve.py ``ConfigFile``): on SIGHUP, and
with ``watch_config`` whenever its contents change; a file that does not parse changes
nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from controller.serve import ConfigFile
from mesh.testing.waits import until

PLAN = {"add": [], "roll": [], "update": [], "remove": [], "unchanged": []}


class Controller:
    """The two things ConfigFile asks of a controller."""

    def __init__(self) -> None:
        self.applied: list[dict[str, Any]] = []
        self.keys_reloaded = 0

    async def apply(self, document: dict[str, Any]) -> dict[str, Any]:
        self.applied.append(document)
        return {"plan": PLAN}

    def reload_keys(self) -> bool:
        self.keys_reloaded += 1
        return False


async def test_a_hangup_and_a_changed_file_are_applied_and_a_broken_file_is_not(
        tmp_path: Path) -> None:
    path = tmp_path / "meshserve.toml"
    path.write_text('[[deployments]]\nname = "a"\nmodel = "m:f"\n')
    controller = Controller()
    reread = ConfigFile(controller, str(path))  # type: ignore[arg-type]
    try:
        reread.on_hangup()
        await until(lambda: len(controller.applied) == 1, 2.0, "the SIGHUP apply")
        assert controller.keys_reloaded == 1
        assert controller.applied[0]["deployments"][0]["name"] == "a"
        reread.watch()
        await asyncio.sleep(1.3)
        assert len(controller.applied) == 1  # unchanged contents: nothing applied again
        path.write_text('[[deployments]]\nname = "b"\nmodel = "m:f"\n')
        await until(lambda: len(controller.applied) == 2, 3.0, "the changed file applied")
        assert controller.applied[1]["deployments"][0]["name"] == "b"
        path.write_text("[[deployments]\nbroken")
        await asyncio.sleep(1.5)
        assert len(controller.applied) == 2  # logged, nothing changed
    finally:
        reread.close()
