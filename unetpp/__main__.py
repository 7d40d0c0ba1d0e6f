from unetpp.cli import main

raise SystemExit(main())
