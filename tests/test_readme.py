from cli.config import REPO_ROOT, config_markdown


def test_readme_lists_every_setting():
    assert config_markdown() in (REPO_ROOT / "README.md").read_text(), (
        "README's configuration table is stale: paste the output of cli.config.config_markdown()"
    )
