from deltafleet.cli import main

raise SystemExit(main())
