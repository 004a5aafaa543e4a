from pcmoe.cli import main

raise SystemExit(main())
