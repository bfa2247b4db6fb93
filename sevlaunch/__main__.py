from sevlaunch.cli import main

raise SystemExit(main())
