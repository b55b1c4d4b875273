from raysegm.cli import main

raise SystemExit(main())
