from promptdistill.cli import main

raise SystemExit(main())
