"""Create the built-in demo directory for `make run` (left alone if it exists)."""

import os
import sys
import textwrap

FILES = {
    "notes/todo.md": """\
        # To do
        - water the plants
        - reply to Ana
        """,
    "notes/ideas.md": """\
        # Ideas
        A filesystem that remembers every save.
        """,
    "code/hello.py": """\
        def greet(name):
            return f"hello, {name}"


        if __name__ == "__main__":
            print(greet("world"))
        """,
    "README.txt": """\
        This is the deltafs demo directory. Edit anything under the mount point
        with any editor; every save becomes a version you can list with
        `deltafs log` and bring back with `deltafs restore`.
        """,
}


def main(root: str) -> None:
    if os.path.isdir(root) and os.listdir(root):
        return
    for rel, text in FILES.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
    print(f"created the demo directory {root}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo/src")
