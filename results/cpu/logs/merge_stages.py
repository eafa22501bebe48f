"""Merge the stage records of the helper processes into results/cpu/stages.json (each entry says which process ran it)."""
import json
from pathlib import Path

main = Path("results/cpu/stages.json")
stages = json.loads(main.read_text())
for entry in stages.values():
    entry.setdefault("process", "main (ppflower reproduce --preset cpu)")
for helper in ("cpu-helper", "cpu-helper2", "cpu-helper-attacks", "cpu-helper-attack-gan"):
    path = Path("results") / helper / "stages.json"
    if path.exists():
        for name, entry in json.loads(path.read_text()).items():
            if entry.get("finished"):
                stages[name] = {**entry, "process": f"helper ({helper})"}
main.write_text(json.dumps(stages, indent=2))
print(len(stages), "stages")
