from autocut.cli import main

raise SystemExit(main())
