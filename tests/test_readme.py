"""The README documents what the code does: every linked file; docs/settings.md every setting."""

import re
from pathlib import Path

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SETTINGS_TABLE = (ROOT / "docs" / "settings.md").read_text()


def test_every_setting_is_in_the_configuration_table():
    documented = set(
        re.findall(r"^\| `LENSSERVE_([A-Z_]+)` \|", SETTINGS_TABLE, flags=re.MULTILINE)
    )
    expected = {name.upper() for name in Settings.model_fields}
    assert documented == expected


def test_every_relative_link_points_at_a_committed_file():
    targets = re.findall(r"\]\(((?!https?://)[^)#]+)\)", README)
    assert targets, "the README links its docs, plots and screenshot"
    missing = [target for target in targets if not (ROOT / target).exists()]
    assert not missing


def test_the_readme_links_the_settings_table_and_names_no_outside_folder():
    assert "(docs/settings.md)" in README
    assert "../" not in README


def test_the_two_set_up_commands_are_make_targets():
    makefile = (ROOT / "Makefile").read_text()
    for target in ("serve", "test"):
        assert f"make {target}" in README
        assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE)
