"""``zhtune studio``: a local web page to prepare data, launch and watch runs, compare results and chat.

The page is served by one process (``zhtune studio --workspace DIR``) and everything it does happens inside
the workspace folder. Forms are generated from the commands' typed config sections, every run is the real
``zhtune`` command in its own process group, and its progress is read back from the files it writes.
"""
