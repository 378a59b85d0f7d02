"""Print the README's "Every command and flag" tables from the CLI itself:
    python tests/readme_flags.py   (paste between '## Every command and flag' and '## Layout')"""
import click

from pipeline import cli


def tables() -> str:
    out = []
    for name, cmd in cli.commands.items():
        out.append(f"#### `{name}`\n\n{cmd.help.splitlines()[0]}\n\n| flag | default | meaning |\n|---|---|---|")
        for p in cmd.params:
            if isinstance(p, click.Argument):
                out.append(f"| `{p.name.upper()}` (argument) | | the cache folder |")
                continue
            flags = " / ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
            d = p.default
            if isinstance(d, bool):
                d = "on" if d else "off"
            elif isinstance(d, tuple) and len(d) == 1:  # a repeatable option's one default value
                d = f"`{d[0]}`"
            else:
                d = "" if d in (None, ()) or not isinstance(d, (int, float, str)) else f"`{d}`"
            choices = f" ({'/'.join(p.type.choices)})" if isinstance(p.type, click.Choice) else ""
            out.append(f"| {flags} | {d} | {(p.help or '').replace('|', '/')}{choices} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(tables())
