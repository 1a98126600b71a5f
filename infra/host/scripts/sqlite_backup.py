"""SQLite's online backup of every prediction log under the model's data directory into the staging copy: argv =
source root, staging root. Consistent while the replicas keep writing (a copy of the live file would not be); run as
the service's user, so no file of the live database changes owner; links are not followed. Standard library only."""

import os
import sqlite3
import sys


def main(source_root: str, stage_root: str) -> None:
    for directory, _, files in os.walk(source_root):
        path = os.path.join(directory, "predictions.sqlite3")
        if "predictions.sqlite3" in files and not os.path.islink(path):
            source = sqlite3.connect(path, timeout=30)
            target = sqlite3.connect(os.path.join(stage_root, os.path.relpath(path, source_root)))
            source.backup(target)
            target.close()
            source.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
